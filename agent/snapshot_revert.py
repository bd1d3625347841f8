"""snapshot-revert: validate (snapshot complete, files present, risks), then
destroy the domain, revert every disk, restore memory, and leave the domain
running or paused.

Once the domain is destroyed the only way is forward: a step that fails
after it is done once more from the journal at once; if that fails too, the
journal entry stays, the domain is *stranded* (listed, with the reason), the
agent tries again at its next start, and a repeated snapshot-revert to the
same snapshot finishes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from . import layers, manifest, quiesce, snapshot_cfg, xlcfg
from .catalogue import Catalogue, Entry
from .domain import Domain, DomainConfig
from .drivers.base import Hypervisor
from .errors import (
    CommandError,
    DomsnapError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    RevertRisky,
    Risk,
)
from .journal import Journal, JournalEntry
from .ledger import Ledger
from .manifest import Manifest
from .operations import Operation
from .progress import Phase, StepProgress, ignore_progress, share
from .storage import Backends
from .xldisk import XlVersion

log = logging.getLogger(__name__)


class RunAfter(StrEnum):
    SNAPSHOT = "snapshot"
    RUNNING = "running"
    PAUSED = "paused"


@dataclass(frozen=True)
class RevertRequest:
    domain: str
    # A name or a directory.
    snapshot: str
    run_after: RunAfter
    force: bool
    # The firmware's variables from its template, not the snapshot's.
    reset_nvram: bool = False


def snapshot_ref(snapshot: str, cfg_text: str, overrides: tuple[str, ...], cfg_name: str = "") -> str:
    """What names the snapshot: the field, or a cfgfile's `name` or `memory_path`."""
    if snapshot:
        return snapshot
    cfg = snapshot_cfg.read(cfg_text, overrides, cfg_name)
    if name := xlcfg.get_str(cfg, "name", ""):
        return name
    if memory := xlcfg.get_str(cfg, "memory_path", ""):
        return str(Path(memory).parent)
    raise InvalidArgument("name the snapshot to revert to: a name, a directory, or a cfgfile with 'name' "
                          "or 'memory_path'")


def _shape(config: DomainConfig) -> dict[str, object]:
    """What must not differ between the snapshot's domain and today's for a
    memory image to fit; disk paths move with external snapshots, so only
    the devices count."""
    return {
        "memory": config.memory_mib,
        "vcpus": config.vcpus,
        "disks": sorted((d.vdev, d.access) for d in config.disks),
        "kernel": config.get_str("kernel"),
    }


@dataclass(frozen=True)
class Stranded:
    """A domain a revert destroyed and could not bring back yet."""

    journal: JournalEntry
    reason: str
    # The grammar its config was written in: the driver's.
    xl: XlVersion

    @property
    def config(self) -> DomainConfig:
        return DomainConfig.parse(self.journal.data["current_config"], source="<journal>", xl=self.xl)


@dataclass(frozen=True)
class RevertPlan:
    snapdir: Path
    manifest: Manifest
    # None when the domain no longer exists (a forced revert recreates it).
    domain: Domain | None
    current: DomainConfig
    paused: bool
    risks: tuple[Risk, ...]
    reset_nvram: bool = False


class SnapshotRevert:
    def __init__(self, driver: Hypervisor, backends: Backends, catalogue: Catalogue, journal: Journal,
                 ledger: Ledger) -> None:
        self._driver = driver
        self._backends = backends
        self._catalogue = catalogue
        self._journal = journal
        self._ledger = ledger
        self._stranded: dict[str, Stranded] = {}

    def stranded(self, domain: str) -> Stranded | None:
        return self._stranded.get(domain)

    def all_stranded(self) -> list[Stranded]:
        return list(self._stranded.values())

    def risks(self, m: Manifest, snap_config: DomainConfig, domain: Domain | None, version: str) -> list[Risk]:
        risks = []
        if domain is None:
            risks.append(Risk("DOMAIN_GONE", f"domains/{m.domain}", f"domain {m.domain} no longer exists"))
        elif _shape(domain.config) != _shape(snap_config):
            changed = [k for k, v in _shape(snap_config).items() if _shape(domain.config)[k] != v]
            risks.append(Risk("CONFIG_CHANGED", f"domains/{m.domain}",
                              f"the domain's configuration changed since the snapshot ({', '.join(changed)})"))
        if m.hypervisor_version != version:
            risks.append(Risk("HYPERVISOR_CHANGED", m.memory_file,
                              f"the memory image was made by {m.hypervisor_version}, this host runs {version}"))
        return risks + layers.changed(self._backends, m)

    def _discarded(self, domain: str, before: DomainConfig, after: DomainConfig) -> list[Path]:
        """Overlays the domain ran on before the revert that no snapshot needs.

        Reverting discards the domain's state since its snapshot; an overlay
        that held it is garbage unless a later snapshot froze it (then it is
        that snapshot's image) or it is what the domain runs on now.
        """
        entries = self._catalogue.entries(domain)
        frozen = {r.image for e in entries for r in e.manifest.disks}
        overlays = {str(f) for e in entries for r in e.manifest.disks
                    for f in self._backends.for_record(r).overlays(r)}
        snapdirs = {e.path for e in entries}
        out = []
        for disk in before.disks:
            old = Path(disk.target)
            if disk.target in frozen or disk.target == after.disk(disk.vdev).target:
                continue
            if disk.target in overlays or (old.parent in snapdirs
                                           and self._backends.for_disk(disk).is_revert_layer(old, disk.vdev)):
                out.append(old)
        return out

    async def prepare(self, req: RevertRequest) -> RevertPlan:
        """Validate everything (snapshot complete, files present, risks); touches nothing."""
        snapdir, m = await asyncio.to_thread(self._catalogue.resolve, req.domain, req.snapshot)
        self._ledger.check(snapdir, m, "revert to")
        if m.driver != self._driver.name:
            raise FailedPrecondition(f"snapshot {m.name} was taken by the {m.driver} driver; this agent runs "
                                     f"{self._driver.name}")
        await self._driver.check_facts(m.facts)
        snap_config = DomainConfig.parse(m.domain_config, source=f"{snapdir}/snapshot.json",
                                         xl=self._driver.xl_version)
        domain: Domain | None
        try:
            domain = await self._driver.lookup(req.domain)
        except NotFound:
            domain = None
        risks = self.risks(m, snap_config, domain, await self._driver.probe())
        if risks and not req.force:
            raise RevertRisky(m.domain, m.name, risks)
        memory = Path(m.memory_file)
        if not memory.is_file() or memory.stat().st_size != m.memory_bytes:
            raise FailedPrecondition(f"snapshot {m.name}: memory image {memory} is missing or truncated")
        current = domain.config if domain is not None else snap_config
        for rec in m.disks:
            await self._backends.for_record(rec).check(rec, current.disk(rec.vdev))
        if req.reset_nvram and "nvram" not in m.facts:
            raise FailedPrecondition(f"snapshot {m.name} holds no UEFI NVRAM to reset")
        paused = req.run_after is RunAfter.PAUSED or (req.run_after is RunAfter.SNAPSHOT and m.state == "paused")
        return RevertPlan(snapdir, m, domain, current, paused, tuple(risks), req.reset_nvram)

    async def run(self, op: Operation, plan: RevertPlan) -> Entry:
        snapdir, m, domain, current, paused = plan.snapdir, plan.manifest, plan.domain, plan.current, plan.paused
        op.phase(Phase.VALIDATE, 5)(1.0, message="snapshot complete" + (
            f"; forced past: {'; '.join(r.description for r in plan.risks)}" if plan.risks else ""))
        # The manifest goes into the journal: recovery redoes what was checked
        # here, whatever the snapshot's folder holds by then.
        journal = JournalEntry(op.id, "revert", m.domain, m.name, op.request_id, data={
            "snapdir": str(snapdir), "current_config": current.to_text(), "paused": paused,
            "manifest": m.to_json(),
            "reset_nvram": plan.reset_nvram,
        })
        await self._journal.begin(journal)
        # The point of no return: past it a cancel is refused, and an agent
        # that dies leaves the journal for the next one to finish the revert.
        op.commit()
        try:
            await self._journal.step(journal, "destroy")
            op.phase(Phase.DESTROY, 10)
            if domain is not None:
                await self._driver.destroy(domain.name)
            await self._apply(journal, m, op.phase(Phase.DISKS, 40), lambda: op.phase(Phase.RESTORE, 98))
        except Exception as err:
            log.warning("revert of %s to %s failed after the domain was destroyed (%s); doing it once more from "
                        "the journal", m.domain, m.name, _message(err))
            await self._again(journal, m, op.phase(Phase.RETRY, 98))
        return Entry(snapdir, m, current=True)

    async def resume(self, op: Operation, stranded: Stranded) -> Entry:
        """A repeated revert of a stranded domain: what the failed one left, done from its journal."""
        op.commit()
        journal = stranded.journal
        m = Manifest.from_json(journal.data["manifest"], "<journal>")
        await self._again(journal, m, op.phase(Phase.RESTORE, 98))
        return Entry(Path(journal.data["snapdir"]), m, current=True)

    async def _again(self, journal: JournalEntry, m: Manifest, progress: StepProgress) -> None:
        """The revert from its journal: what a failed step left is destroyed, every step done again.
        On failure the domain is stranded and the journal entry kept."""
        try:
            with contextlib.suppress(NotFound):
                # A domain half restored.
                await self._driver.destroy((await self._driver.lookup(journal.domain)).name)
            await self._apply(journal, m, ignore_progress, lambda: progress)
        except Exception as err:
            reason = f"the revert to {m.name} failed after the domain was destroyed: {_message(err)}"
            self._stranded[journal.domain] = Stranded(journal, reason, self._driver.xl_version)
            log.error("domain %s is stranded: %s; the agent tries again at its next start, and "
                      "snapshot-revert %s %s finishes it", journal.domain, reason, journal.domain, m.name)
            # Same status code; a CommandError (what a tool said) is told as the InternalError it is.
            cls = type(err) if isinstance(err, DomsnapError) and not isinstance(err, CommandError) else InternalError
            raise cls(f"domain {journal.domain}: {reason}; it was tried twice; snapshot-revert {journal.domain} "
                      f"{m.name} finishes it") from err

    async def _apply(self, journal: JournalEntry, m: Manifest, disk_progress: StepProgress,
                     restore_phase: Callable[[], StepProgress]) -> None:
        """Everything after the domain is gone: disks, memory, bookkeeping."""
        snap_config = DomainConfig.parse(m.domain_config, source=f"{journal.data['snapdir']}/snapshot.json",
                                       xl=self._driver.xl_version)
        current = DomainConfig.parse(journal.data["current_config"], source="<journal>", xl=self._driver.xl_version)
        disks = {d.vdev: d for d in snap_config.disks}
        for i, rec in enumerate(m.disks):
            await self._journal.step(journal, f"disk:{rec.vdev}")
            disks[rec.vdev] = await self._backends.for_record(rec).revert(
                rec, current.disk(rec.vdev), share(disk_progress, i, len(m.disks)))
        config = snap_config.with_disks([disks[d.vdev] for d in snap_config.disks])
        await self._journal.step(journal, "restore")
        await self._driver.restore(config, Path(m.memory_file), facts=m.facts, paused=journal.data["paused"],
                                   progress=restore_phase(), reset_nvram=journal.data.get("reset_nvram", False))
        await self._journal.step(journal, "restored")
        await self._finish(journal, m, current, config, restore_phase())

    async def _finish(self, journal: JournalEntry, m: Manifest, before: DomainConfig, after: DomainConfig,
                      progress: StepProgress) -> None:
        if m.quiesced and not journal.data["paused"]:
            # Its memory holds a guest with frozen filesystems, as at the
            # instant. (Reverted paused, it stays so until thawed: a guest
            # agent answers only in a running guest.)
            thawed = await quiesce.thaw(self._driver, journal.domain, "the restored quiesced guest")
            progress(1.0, message="guest filesystems thawed: " + (
                "the guest agent did not answer" if thawed is None else f"{thawed} were frozen at the instant"))
        self._stranded.pop(journal.domain, None)
        await asyncio.to_thread(self._close, journal, before, after)

    def _close(self, journal: JournalEntry, before: DomainConfig, after: DomainConfig) -> None:
        """The revert's last steps, off the event loop in one go: the current
        snapshot, the discarded overlays removed, the journal's entry last."""
        self._catalogue.set_current(journal.domain, journal.snapshot)
        for orphan in self._discarded(journal.domain, before, after):
            log.info("revert: removing %s, the discarded state's overlay", orphan)
            orphan.unlink(missing_ok=True)
        self._journal.close(journal)

    async def recover(self, journal: JournalEntry) -> str:
        """Finish a revert a dead agent left past its point of no return."""
        if not journal.reached("destroy"):
            return "nothing to do"
        m = (Manifest.from_json(journal.data["manifest"], "<journal>") if "manifest" in journal.data
             else manifest.read(Path(journal.data["snapdir"])))
        current = DomainConfig.parse(journal.data["current_config"], source="<journal>", xl=self._driver.xl_version)
        try:
            domain = await self._driver.lookup(journal.domain)
        except NotFound:
            domain = None
        if journal.reached("restored") and domain is not None:
            await self._finish(journal, m, current, domain.config, ignore_progress)
            return "completed"
        # The old domain half destroyed, or a restore cut short.
        await self._again(journal, m, ignore_progress)
        return "completed"


def _message(err: Exception) -> str:
    return err.message if isinstance(err, DomsnapError) else f"{type(err).__name__}: {err}"
