"""snapshot-delete: the snapshot stops existing first (its manifest goes),
then what only it needed goes too: its qcow2 tags, its memory image and the
files of its directory that no disk chain still reads through. A file the
domain or another snapshot still depends on (an overlay below the domain's
disk, a frozen image) stays where it is: never a dangling chain, never a
deleted base. Children of a deleted snapshot get its parent as theirs.

Chains merge back: the overlay an external snapshot made (its layer) is
folded into the image below it once nothing needs the snapshot's instant
between them (live through the domain's hypervisor when the domain reads
that chain, offline otherwise), and a snapshot whose frozen image was that
layer is told the image below instead. A layer is not merged, and the reason
logged, where another snapshot still needs the image below as it is (it is
that snapshot's frozen image, or a chain branches there after a revert)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import dirfd, layers, manifest
from .catalogue import Catalogue, Entry
from .domain import Domain
from .drivers.base import Hypervisor
from .errors import CommandError, DomsnapError, FailedPrecondition, InternalError, NotFound
from .journal import Journal, JournalEntry
from .ledger import Ledger
from .manifest import Manifest
from .operations import Operation
from .progress import Phase, StepProgress, ignore_progress, share
from .snapshot_edit import reparent
from .storage import Backends
from .storage.base import DiskBackend, DiskRecord, Method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeletePlan:
    domain: str
    # Descendants before their parents.
    doomed: tuple[Entry, ...]
    dom: Domain | None


class SnapshotDelete:
    def __init__(self, driver: Hypervisor, backends: Backends, catalogue: Catalogue, journal: Journal,
                 ledger: Ledger) -> None:
        self._driver = driver
        self._backends = backends
        self._catalogue = catalogue
        self._journal = journal
        self._ledger = ledger

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
        path, m = await asyncio.to_thread(self._catalogue.resolve, domain, ref)
        doomed = self._doomed(domain, Entry(path, m, self._catalogue.current(domain) == m.name), children)
        dom = await self._domain(domain)
        for e in doomed:
            self._ledger.check(e.path, e.manifest, "delete")
            await self._check(e.manifest, dom)
        return DeletePlan(domain, tuple(doomed), dom)

    async def run(self, op: Operation, plan: DeletePlan) -> DeletePlan:
        """Delete what the plan names; the plan is the result (what was deleted)."""
        domain, doomed, dom = plan.domain, plan.doomed, plan.dom
        op.phase(Phase.VALIDATE, 5)(1.0, message=", ".join(e.manifest.name for e in doomed))
        op.commit()
        sink = op.phase(Phase.DELETE, 99)
        for i, e in enumerate(doomed):
            journal = JournalEntry(op.id, "delete", domain, e.manifest.name, op.request_id,
                                   data={"snapdir": str(e.path), "manifest": e.manifest.to_json(),
                                         "registered": self._catalogue.path_of(domain, e.manifest.name) == e.path})
            await self._journal.begin(journal)
            # Looked up again each time: a merge may have moved the domain's disks.
            dom = await self._domain(domain) if dom is not None else None
            try:
                await self._delete(journal, dom, share(sink, i, len(doomed)))
            except Exception as err:
                await self._again(journal, err)
            await self._journal.finish(journal)
            sink((i + 1) / len(doomed), message=f"deleted {e.manifest.name}")
        return plan

    async def _again(self, journal: JournalEntry, err: Exception) -> None:
        """A delete goes only forward: a failed step is done once more at once (a delete is
        idempotent); failing again, the journal entry stays and the next agent finishes it."""
        log.warning("delete of %s on %s failed half-way (%s); doing it once more", journal.snapshot,
                    journal.domain, err)
        try:
            await self._delete(journal, await self._domain(journal.domain))
        except Exception as again:
            # Same status code; a CommandError (what a tool said) is told as the InternalError it is.
            told = isinstance(again, DomsnapError) and not isinstance(again, CommandError)
            cls = type(again) if told else InternalError
            message = again.message if isinstance(again, DomsnapError) else str(again)
            raise cls(f"delete of snapshot {journal.snapshot} failed half-way, twice: {message}; it is no longer "
                      "listed, and the agent removes the rest at its next start") from again

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

    async def _delete(self, journal: JournalEntry, dom: Domain | None,
                      progress: StepProgress = ignore_progress) -> None:
        m = Manifest.from_json(journal.data["manifest"], "<journal>")
        snapdir = Path(journal.data["snapdir"])
        await self._journal.step(journal, "unregister")
        registered = journal.data.get("registered", True)
        await asyncio.to_thread(self._unregister, m, snapdir, registered)
        await self._journal.step(journal, "disks")
        block = self._driver.block_ops(dom.name) if dom is not None else None
        for rec in m.disks:
            active = dom is not None and dom.config.disk(rec.vdev).target == rec.image
            await self._backends.for_record(rec).delete(rec, block, active)
        if "merges" not in journal.data:
            # Planned once; an agent that resumes this delete follows the same plan.
            journal.data["merges"] = await self._plan_merges(m, dom, progress)
        await self._journal.step(journal, "merge")
        for merge in journal.data["merges"]:
            rec = DiskRecord.from_dict(merge["record"])
            progress(0.5, message=f"{rec.vdev}: merging {rec.file} into {rec.image}")
            await self._backends.for_record(rec).merge(rec, block, merge["top"] or None, merge["children"])
            self._repoint(m.domain, rec)
            layers.refresh(self._catalogue, self._backends, m.domain, [rec.image, *merge["children"]])
        if journal.data["merges"] and dom is not None:
            dom = await self._domain(dom.config.name)
        await self._journal.step(journal, "files")
        # Off the event loop: freeing a large image's blocks takes a while.
        memory = Path(m.memory_file)
        for file in (memory, *self._driver.snapshot_files(memory)):
            await asyncio.to_thread(dirfd.unlink, file, snapdir)
        await self._remove_unused_files(m, snapdir, dom)
        if registered:
            self._ledger.forget(m.domain, m.name)

    async def _chains(self, m: Manifest, dom: Domain | None) -> list[list[str]]:
        """The chains read to run the domain or to revert to another snapshot."""
        heads: list[tuple[str, DiskBackend]] = []
        if dom is not None:
            heads += [(d.target, self._backends.for_disk(d)) for d in dom.config.disks]
        heads += [(r.image, self._backends.for_record(r)) for e in self._catalogue.entries(m.domain)
                  for r in e.manifest.disks]
        return [await backend.chain(image) for image, backend in dict(heads).items() if os.path.exists(image)]

    async def _plan_merges(self, m: Manifest, dom: Domain | None, progress: StepProgress) -> list[dict[str, Any]]:
        def skip(reason: str) -> None:
            log.info("delete %s: %s", m.name, reason)
            progress(0.5, message=reason)

        chains = await self._chains(m, dom)
        frozen = {r.image: e.manifest.name for e in self._catalogue.entries(m.domain) for r in e.manifest.disks}
        plan = []
        for rec in m.disks:
            layer, below = rec.file, rec.image
            if not self._backends.for_record(rec).mergeable(rec) or not any(layer in c for c in chains):
                continue  # nothing reads the layer: it is removed with the snapshot's files
            if below in frozen:
                skip(f"not merging {layer}: snapshot {frozen[below]} needs {below} as it is")
                continue
            if any(below in c and c[c.index(below) - 1 : c.index(below)] != [layer] for c in chains):
                skip(f"not merging {layer}: another chain branches at {below} (a revert)")
                continue
            top = ""
            if dom is not None and layer in (running := await self._backends.for_record(rec).chain(
                    dom.config.disk(rec.vdev).target)):
                top = running[0]
            children = sorted({c[c.index(layer) - 1] for c in chains if layer in c[1:]})
            plan.append({"record": rec.to_dict(), "top": top, "children": children})
        return plan

    def _repoint(self, domain: str, merged: DiskRecord) -> None:
        """Snapshots whose frozen image was the merged layer now have the image below it."""
        for e in self._catalogue.entries(domain):
            if any(r.vdev == merged.vdev and r.image == merged.file for r in e.manifest.disks):
                disks = tuple(replace(r, image=merged.image) if r.vdev == merged.vdev and r.image == merged.file
                              else r for r in e.manifest.disks)
                # The ledger first: a crash between leaves it allowing a file the manifest does not name yet.
                self._ledger.extend(e.manifest.domain, e.manifest.name, e.path, [merged.image])
                manifest.write(e.path, replace(e.manifest, disks=disks))
                self._catalogue.reindex(domain, e.manifest.name, e.path)

    def _unregister(self, m: Manifest, snapdir: Path, registered: bool) -> None:
        """The snapshot stops existing: its manifest gone and, when the catalogue
        knows it (a folder it does not know may carry another snapshot's name),
        out of the catalogue with its children reparented."""
        if registered:
            if self._catalogue.current(m.domain) == m.name:
                self._catalogue.set_current(m.domain, m.parent)
            self._catalogue.unregister(m.domain, m.name)
        dirfd.unlink(snapdir / manifest.MANIFEST, snapdir)
        if registered:
            reparent(self._catalogue, m.domain, m.name, m.parent)

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

        def keep(path: Path) -> bool:
            if str(path) in used:
                log.info("delete %s: keeping %s, a disk chain still reads it", m.name, path)
                return True
            return False

        def remove() -> None:
            # Files elsewhere are only those the ledger allowed (prepare).
            for path in sorted({Path(r.file) for r in m.disks if r.file and Path(r.file).parent != snapdir}):
                if not keep(path):
                    path.unlink(missing_ok=True)
            dirfd.remove_files(snapdir, keep)

        # Off the event loop: freeing a large image's blocks takes a while.
        await asyncio.to_thread(remove)

    async def recover(self, journal: JournalEntry) -> str:
        """A delete past its point of no return is finished (it is idempotent)."""
        await self._delete(journal, await self._domain(journal.domain))
        return "completed"

