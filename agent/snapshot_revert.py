"""snapshot-revert: validate (snapshot complete, files present, risks), then
destroy the domain, revert every disk, restore memory, and leave the domain
running or paused."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from domsnap.agent import manifest, snapshot_cfg, xlcfg
from domsnap.agent.catalogue import Catalogue, Entry
from domsnap.agent.domain import Domain, DomainConfig
from domsnap.agent.drivers.base import Hypervisor
from domsnap.agent.errors import FailedPrecondition, InvalidArgument, NotFound
from domsnap.agent.journal import Entry as JournalEntry
from domsnap.agent.journal import Journal
from domsnap.agent.manifest import Manifest
from domsnap.agent.operations import Operation
from domsnap.agent.progress import StepProgress, ignore_progress, share
from domsnap.agent.storage import Backends
from domsnap.agent.storage.base import Method

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


def snapshot_ref(snapshot: str, cfg_text: str, overrides: tuple[str, ...]) -> str:
    """What names the snapshot: the field, or a cfgfile's `name` or `memory_path`."""
    if snapshot:
        return snapshot
    cfg = snapshot_cfg.read(cfg_text, overrides)
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


def _is_revert_overlay(path: Path, vdev: str) -> bool:
    return re.fullmatch(rf"{re.escape(vdev)}\.r\d+\.qcow2", path.name) is not None


@dataclass(frozen=True)
class RevertPlan:
    snapdir: Path
    manifest: Manifest
    # None when the domain no longer exists (a forced revert recreates it).
    domain: Domain | None
    current: DomainConfig
    paused: bool
    risks: tuple[str, ...]


class SnapshotRevert:
    def __init__(self, driver: Hypervisor, backends: Backends, catalogue: Catalogue, journal: Journal) -> None:
        self._driver = driver
        self._backends = backends
        self._catalogue = catalogue
        self._journal = journal

    def risks(self, m: Manifest, snap_config: DomainConfig, domain: Domain | None, version: str) -> list[str]:
        risks = []
        if domain is None:
            risks.append(f"domain {m.domain} no longer exists")
        elif _shape(domain.config) != _shape(snap_config):
            changed = [k for k, v in _shape(snap_config).items() if _shape(domain.config)[k] != v]
            risks.append(f"the domain's configuration changed since the snapshot ({', '.join(changed)})")
        if m.hypervisor_version != version:
            risks.append(f"the memory image was made by {m.hypervisor_version}, this host runs {version}")
        return risks

    def _discarded(self, domain: str, before: DomainConfig, after: DomainConfig) -> list[Path]:
        """Overlays the domain ran on before the revert that no snapshot needs.

        Reverting discards the domain's state since its snapshot; an overlay
        that held it is garbage unless a later snapshot froze it (then it is
        that snapshot's image) or it is what the domain runs on now.
        """
        entries = self._catalogue.entries(domain)
        frozen = {r.image for e in entries for r in e.manifest.disks}
        overlays = {r.file for e in entries for r in e.manifest.disks
                    if r.method is Method.EXTERNAL and r.backend == "qcow2"}
        snapdirs = {e.path for e in entries}
        out = []
        for disk in before.disks:
            old = Path(disk.target)
            if disk.target in frozen or disk.target == after.disk(disk.vdev).target:
                continue
            if disk.target in overlays or (old.parent in snapdirs and _is_revert_overlay(old, disk.vdev)):
                out.append(old)
        return out

    async def prepare(self, req: RevertRequest) -> RevertPlan:
        """Validate everything (snapshot complete, files present, risks); touches nothing."""
        snapdir, m = self._catalogue.resolve(req.domain, req.snapshot)
        if m.driver != self._driver.name:
            raise FailedPrecondition(f"snapshot {m.name} was taken by the {m.driver} driver; this agent runs "
                                     f"{self._driver.name}")
        snap_config = DomainConfig.parse(m.domain_config, source=f"{snapdir}/snapshot.json")
        domain: Domain | None
        try:
            domain = await self._driver.lookup(req.domain)
        except NotFound:
            domain = None
        risks = self.risks(m, snap_config, domain, await self._driver.probe())
        if risks and not req.force:
            raise FailedPrecondition(f"refusing to revert {m.domain} to {m.name}: " + "; ".join(risks)
                                     + " (--force reverts anyway)")
        memory = Path(m.memory_file)
        if not memory.is_file() or memory.stat().st_size != m.memory_bytes:
            raise FailedPrecondition(f"snapshot {m.name}: memory image {memory} is missing or truncated")
        current = domain.config if domain is not None else snap_config
        for rec in m.disks:
            await self._backends.for_record(rec).check(rec, current.disk(rec.vdev))
        paused = req.run_after is RunAfter.PAUSED or (req.run_after is RunAfter.SNAPSHOT and m.state == "paused")
        return RevertPlan(snapdir, m, domain, current, paused, tuple(risks))

    async def run(self, op: Operation, plan: RevertPlan) -> Entry:
        snapdir, m, domain, current, paused = plan.snapdir, plan.manifest, plan.domain, plan.current, plan.paused
        op.phase("validate", 5)(1.0, 0, 0, 0.0, "snapshot complete" + (
            f"; forced past: {'; '.join(plan.risks)}" if plan.risks else ""))
        journal = JournalEntry(op.id, "revert", m.domain, m.name, op.request_id, data={
            "snapdir": str(snapdir), "current_config": current.to_text(), "paused": paused,
        })
        await self._journal.begin(journal)
        # The point of no return: past it a cancel is refused, and an agent
        # that dies leaves the journal for the next one to finish the revert.
        op.commit()
        try:
            await self._journal.step(journal, "destroy")
            op.phase("destroy", 10)
            if domain is not None:
                await self._driver.destroy(domain.name)
            await self._apply(journal, m, op.phase("disks", 40), lambda: op.phase("restore", 98))
        except Exception:
            # Reported to the caller, who decides what next; only an agent
            # that dies (or is stopped) mid-way leaves the entry to recovery.
            await self._journal.finish(journal)
            raise
        return Entry(snapdir, m, current=True)

    async def _apply(self, journal: JournalEntry, m: Manifest, disk_progress: StepProgress,
                     restore_phase: Callable[[], StepProgress]) -> None:
        """Everything after the domain is gone: disks, memory, bookkeeping."""
        snap_config = DomainConfig.parse(m.domain_config, source=f"{journal.data['snapdir']}/snapshot.json")
        current = DomainConfig.parse(journal.data["current_config"], source="<journal>")
        disks = {d.vdev: d for d in snap_config.disks}
        for i, rec in enumerate(m.disks):
            await self._journal.step(journal, f"disk:{rec.vdev}")
            disks[rec.vdev] = await self._backends.for_record(rec).revert(
                rec, current.disk(rec.vdev), share(disk_progress, i, len(m.disks)))
        config = snap_config.with_disks([disks[d.vdev] for d in snap_config.disks])
        await self._journal.step(journal, "restore")
        await self._driver.restore(config, Path(m.memory_file), facts=m.facts, paused=journal.data["paused"],
                                   progress=restore_phase())
        await self._journal.step(journal, "restored")
        await self._finish(journal, current, config)

    async def _finish(self, journal: JournalEntry, before: DomainConfig, after: DomainConfig) -> None:
        await asyncio.to_thread(self._catalogue.set_current, journal.domain, journal.snapshot)
        for orphan in self._discarded(journal.domain, before, after):
            log.info("revert: removing %s, the discarded state's overlay", orphan)
            orphan.unlink(missing_ok=True)
        await self._journal.finish(journal)

    async def recover(self, journal: JournalEntry) -> str:
        """Finish a revert a dead agent left past its point of no return."""
        if not journal.reached("destroy"):
            return "nothing to do"
        snapdir = Path(journal.data["snapdir"])
        m = manifest.read(snapdir)
        current = DomainConfig.parse(journal.data["current_config"], source="<journal>")
        try:
            domain = await self._driver.lookup(journal.domain)
        except NotFound:
            domain = None
        if journal.reached("restored") and domain is not None:
            await self._finish(journal, current, domain.config)
            return "completed"
        if domain is not None:
            # The old domain half destroyed, or a restore cut short.
            await self._driver.destroy(domain.name)
        await self._apply(journal, m, ignore_progress, lambda: ignore_progress)
        return "completed"
