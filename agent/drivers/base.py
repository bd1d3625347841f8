"""The hypervisor interface: one implementation module per hypervisor."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..domain import Domain, DomainConfig
from ..errors import FailedPrecondition
from ..progress import StepProgress
from ..storage.base import BlockOps
from ..xldisk import DEFAULT_XL, XlVersion
from .qga import GuestAgent


@dataclass(frozen=True)
class CheckpointResult:
    memory_bytes: int
    # Guest pause as the hypervisor saw it (STOP to RESUME), in seconds.
    downtime: float
    # Facts of this checkpoint besides `facts()`: files taken at the instant
    # beside the memory image (a UEFI domain's NVRAM), and how a live one
    # wrote memory (live_mode), for whoever reads the manifest.
    facts: Mapping[str, str] = field(default_factory=dict)
    # Wall-clock seconds (epoch) when the guest paused for the instant and
    # resumed; 0 where the driver cannot tell.
    paused_at: float = 0.0
    resumed_at: float = 0.0


# Called once while the guest is stopped at the instant the memory image
# captures; the disks are snapshotted inside it.
InPause = Callable[[BlockOps], Awaitable[None]]
# Awaited with the guest still stopped at the instant, once the checkpoint
# has taken all it can without resuming it: the disks, and the memory image
# unless saving its rest is what resumes the guest (a QEMU background
# snapshot). The guest resumes when it returns (a paused domain stays so).
# A group snapshot's member waits there for its coordinator's COMMIT: its
# own state is taken while its peers are still pausing. Raising there fails
# the checkpoint as any failure in the pause does.
BeforeResume = Callable[[], Awaitable[None]]
# Awaited once the guest is ready to pause (a live checkpoint: its memory
# copied once while it runs); the pause begins when it returns. A group
# snapshot's members wait there for each other.
BeforePause = Callable[[], Awaitable[None]]
# Told the name of a step of the driver's own before it runs (journaled by the caller).
Step = Callable[[str], Awaitable[None]]


async def no_step(_name: str) -> None:
    pass


class Hypervisor(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def probe(self) -> str:
        """Check the hypervisor answers; returns its version ("QEMU 7.2.22")."""

    @property
    def xl_version(self) -> XlVersion:
        """The xl whose grammar domain configs follow: Debian 12's unless the driver faces another."""
        return DEFAULT_XL

    @abstractmethod
    async def start(self) -> None:
        """Re-attach to the domains that outlived a previous agent."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the hypervisor; domains keep running."""

    @abstractmethod
    def capabilities(self) -> list[str]: ...

    @abstractmethod
    async def list_domains(self) -> list[Domain]: ...

    @abstractmethod
    async def lookup(self, ref: str) -> Domain:
        """A domain by name or domid, as xl takes <Domain>; NotFound otherwise."""

    @abstractmethod
    async def create(self, config: DomainConfig, *, paused: bool) -> Domain: ...

    @abstractmethod
    async def destroy(self, name: str) -> None: ...

    @abstractmethod
    async def pause(self, name: str) -> Domain: ...

    @abstractmethod
    async def unpause(self, name: str) -> Domain: ...

    async def change_medium(self, name: str, vdev: str, target: str) -> Domain:
        """Insert a raw image (`target`) into a CD-ROM drive, or eject it (`target` empty)."""
        raise FailedPrecondition(f"the {self.name} driver does not change CD-ROM media")

    def guest_agent(self, name: str) -> GuestAgent:
        """The domain's QEMU guest agent (to freeze its filesystems); FailedPrecondition if it has none."""
        raise FailedPrecondition(f"the {self.name} driver cannot quiesce a guest: it gives domains no "
                                 "guest-agent channel", reason="QUIESCE_UNSUPPORTED", domain=name)

    @abstractmethod
    def block_ops(self, name: str) -> BlockOps:
        """Disk operations through the hypervisor that holds the domain's images; the
        domain's config follows the disks they move."""

    @abstractmethod
    async def checkpoint(
        self, domain: Domain, memory: Path, *, live: bool, in_pause: InPause, progress: StepProgress,
        step: Step = no_step, before_pause: BeforePause | None = None, before_resume: BeforeResume | None = None,
    ) -> CheckpointResult:
        """Write the memory image and run `in_pause` at the same instant, then
        leave the domain in the run state it had before. The image and the
        files beside it (`snapshot_files`) are written, not synced: the
        caller syncs them while it goes on with its own work. `step` is told of
        the driver's own steps where a crash matters (so fault injection reaches them);
        `before_pause`, when given, is awaited just before the guest pauses,
        `before_resume` just before it resumes."""

    @abstractmethod
    async def abandon_transfers(self, name: str) -> None:
        """Cancel a memory save a dead agent left running (the guest may be
        stopped, waiting for it); the guest's run state is then the caller's."""

    @abstractmethod
    def facts(self, domain: Domain) -> dict[str, str]:
        """What a memory image of this domain needs to be restored (e.g. QEMU's machine type)."""

    def snapshot_files(self, memory: Path) -> list[Path]:
        """Files a checkpoint may write beside the memory image `memory`
        (removed with it when a create rolls back or a snapshot is deleted)."""
        return []

    @abstractmethod
    async def check_facts(self, facts: Mapping[str, str]) -> None:
        """Refuse (FailedPrecondition) facts from a manifest that this host cannot restore with,
        before anything is touched: they reach a command line."""

    @abstractmethod
    async def restore(
        self, config: DomainConfig, memory: Path, *, facts: Mapping[str, str], paused: bool,
        progress: StepProgress, reset_nvram: bool = False,
    ) -> Domain:
        """Start the domain from a memory image; its disks are already reverted.
        `reset_nvram`: its firmware variables start over from the firmware's
        template instead of the snapshot's."""
