"""snapshot-delete: the snapshot stops existing first (its manifest goes),
then what only it needed goes too: its qcow2 tags, its memory image and the
files of its directory that no disk chain still reads through. A file the
domain or another snapshot still depends on (an overlay below the domain's
disk, a frozen image) stays where it is: never a dangling chain, never a
deleted base. Children of a deleted snapshot get its parent as theirs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from domsnap.agent import manifest
from domsnap.agent.catalogue import Catalogue, Entry
from domsnap.agent.domain import Domain
from domsnap.agent.drivers.base import Hypervisor
from domsnap.agent.errors import FailedPrecondition, NotFound
from domsnap.agent.journal import Entry as JournalEntry
from domsnap.agent.journal import Journal
from domsnap.agent.manifest import Manifest
from domsnap.agent.operations import Operation
from domsnap.agent.storage import Backends
from domsnap.agent.storage.base import DiskBackend, Method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeletePlan:
    domain: str
    # Descendants before their parents.
    doomed: tuple[Entry, ...]
    dom: Domain | None


class SnapshotDelete:
    def __init__(self, driver: Hypervisor, backends: Backends, catalogue: Catalogue, journal: Journal) -> None:
        self._driver = driver
        self._backends = backends
        self._catalogue = catalogue
        self._journal = journal

    def _doomed(self, domain: str, target: Entry, children: bool) -> list[Entry]:
        """The snapshots to delete, descendants before their parents."""
        if not children:
            return [target]
        entries = self._catalogue.entries(domain)
        out: list[Entry] = []

        def visit(e: Entry) -> None:
            for child in entries:
                if child.manifest.parent == e.manifest.name:
                    visit(child)
            out.append(e)

        visit(target)
        return out

    async def _domain(self, name: str) -> Domain | None:
        try:
            return await self._driver.lookup(name)
        except NotFound:
            return None

    async def prepare(self, domain: str, ref: str, children: bool) -> DeletePlan:
        """What to delete, checked before anything is touched."""
        path, m = self._catalogue.resolve(domain, ref)
        doomed = self._doomed(domain, Entry(path, m, self._catalogue.current(domain) == m.name), children)
        dom = await self._domain(domain)
        for e in doomed:
            await self._check(e.manifest, dom)
        return DeletePlan(domain, tuple(doomed), dom)

    async def run(self, op: Operation, plan: DeletePlan) -> None:
        domain, doomed, dom = plan.domain, plan.doomed, plan.dom
        op.phase("validate", 5)(1.0, 0, 0, 0.0, ", ".join(e.manifest.name for e in doomed))
        op.commit()
        sink = op.phase("delete", 99)
        for i, e in enumerate(doomed):
            journal = JournalEntry(op.id, "delete", domain, e.manifest.name, op.request_id,
                                   data={"snapdir": str(e.path), "manifest": e.manifest.to_json()})
            await self._journal.begin(journal)
            await self._delete(journal, dom)
            await self._journal.finish(journal)
            sink((i + 1) / len(doomed), 0, 0, 0.0, f"deleted {e.manifest.name}")

    async def _check(self, m: Manifest, dom: Domain | None) -> None:
        """Refuse, before anything is touched, what cannot be done now."""
        for rec in m.disks:
            if rec.method is not Method.INTERNAL or dom is None:
                continue
            disk = dom.config.disk(rec.vdev)
            top = disk.target
            if rec.image != top and rec.image in await self._backends.for_disk(disk).chain(top):
                raise FailedPrecondition(
                    f"snapshot {m.name}: its tag lives in {rec.image}, now a read-only backing image of the running "
                    f"domain's disk {rec.vdev}; it can be deleted once domain {dom.name} is stopped")

    async def _delete(self, journal: JournalEntry, dom: Domain | None) -> None:
        m = Manifest.from_json(journal.data["manifest"], "<journal>")
        snapdir = Path(journal.data["snapdir"])
        await self._journal.step(journal, "unregister")
        await asyncio.to_thread(self._unregister, m, snapdir)
        await self._journal.step(journal, "disks")
        block = self._driver.block_ops(dom.name) if dom is not None else None
        for rec in m.disks:
            active = dom is not None and dom.config.disk(rec.vdev).target == rec.image
            await self._backends.for_record(rec).delete(rec, block, active)
        await self._journal.step(journal, "files")
        await asyncio.to_thread(Path(m.memory_file).unlink, missing_ok=True)
        await self._remove_unused_files(m, snapdir, dom)

    def _unregister(self, m: Manifest, snapdir: Path) -> None:
        """The snapshot stops existing: out of the catalogue, its manifest gone, its children reparented."""
        if self._catalogue.current(m.domain) == m.name:
            self._catalogue.set_current(m.domain, m.parent)
        self._catalogue.unregister(m.domain, m.name)
        (snapdir / manifest.MANIFEST).unlink(missing_ok=True)
        self._reparent_children(m)

    def _reparent_children(self, m: Manifest) -> None:
        for e in self._catalogue.entries(m.domain):
            if e.manifest.parent == m.name:
                child = Manifest.from_json(e.manifest.to_json(), str(e.path))
                manifest.write(e.path, Manifest(**{**child.__dict__, "parent": m.parent}))
                self._catalogue.reindex(m.domain, child.name, e.path)

    async def _in_use(self, m: Manifest, dom: Domain | None) -> set[str]:
        """Every file a disk chain of the domain or of another snapshot reads."""
        heads: list[tuple[str, DiskBackend]] = []
        if dom is not None:
            heads += [(d.target, self._backends.for_disk(d)) for d in dom.config.disks]
        for e in self._catalogue.entries(m.domain):
            heads += [(f, self._backends.for_record(r)) for r in e.manifest.disks for f in (r.image, r.file) if f]
        used: set[str] = set()
        for image, backend in heads:
            if image in used or not os.path.exists(image):
                continue
            used.update(await backend.chain(image))
        return used

    async def _remove_unused_files(self, m: Manifest, snapdir: Path, dom: Domain | None) -> None:
        used = await self._in_use(m, dom)
        # Off the event loop: freeing a large image's blocks takes a while.
        await asyncio.to_thread(self._remove_files, m, snapdir, used)

    @staticmethod
    def _remove_files(m: Manifest, snapdir: Path, used: set[str]) -> None:
        own = {Path(r.file) for r in m.disks if r.file}
        candidates = set(snapdir.iterdir()) if snapdir.is_dir() else set()
        for path in sorted(candidates | own):
            if str(path) in used:
                log.info("delete %s: keeping %s, a disk chain still reads it", m.name, path)
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            snapdir.rmdir()

    async def recover(self, journal: JournalEntry) -> str:
        """A delete past its point of no return is finished (it is idempotent)."""
        await self._delete(journal, await self._domain(journal.domain))
        return "completed"

