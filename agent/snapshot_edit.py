"""snapshot-edit: change what a snapshot says of itself, its description or
its name, without touching its disks or memory.

A rename is allowed only where no disk holds the name: an internal qcow2
snapshot's tag and an LVM snapshot volume are named after it, so those
snapshots keep theirs. It changes several files (the manifest, the
catalogue's index and current pointer, the children's manifests), so it is
journaled; every step is idempotent and recovery simply does them all again.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

from . import manifest
from .catalogue import Catalogue, Entry
from .errors import AlreadyExists, FailedPrecondition
from .journal import Journal, JournalEntry
from .ledger import Ledger
from .names import check_name


def reparent(catalogue: Catalogue, domain: str, old: str, new: str) -> None:
    """The snapshots taken on top of `old` get `new` as their parent (idempotent):
    after a rename, and after a delete (the deleted one's parent)."""
    for e in catalogue.entries(domain):
        if e.manifest.parent == old:
            manifest.write(e.path, replace(e.manifest, parent=new))
            catalogue.reindex(domain, e.manifest.name, e.path)


class SnapshotEdit:
    def __init__(self, catalogue: Catalogue, journal: Journal, ledger: Ledger) -> None:
        self._catalogue = catalogue
        self._journal = journal
        self._ledger = ledger

    async def edit(self, domain: str, ref: str, *, description: str | None, new_name: str, request_id: str,
                   ) -> Entry:
        """The snapshot after the change; refused, touching nothing, when the name cannot change."""
        path, m = self._catalogue.resolve(domain, ref)
        if new_name and new_name != m.name:
            check_name("snapshot", new_name)
            if self._catalogue.path_of(domain, new_name) is not None:
                raise AlreadyExists(f"domain {domain} already has a snapshot named {new_name!r}",
                                    reason="SNAPSHOT_EXISTS", domain=domain, snapshot=new_name)
            if held := [f"{r.vdev} ({r.backend} {r.tag})" for r in m.disks if r.tag]:
                raise FailedPrecondition(
                    f"snapshot {m.name} cannot be renamed: its disks hold the name ({', '.join(held)}), and "
                    f"they cannot rename it. Change its description instead, or take a new snapshot named "
                    f"{new_name}", domain=domain, snapshot=m.name)
        if description is not None and description != m.description:
            m = replace(m, description=description)
            if not new_name or new_name == m.name:
                manifest.write(path, m)  # one atomic write: nothing to journal
                self._catalogue.reindex(domain, m.name, path)
        if new_name and new_name != m.name:
            journal = JournalEntry(uuid.uuid4().hex, "rename", domain, m.name, request_id,
                                   data={"snapdir": str(path), "new_name": new_name, "manifest": m.to_json()})
            await self._journal.begin(journal)
            await self._rename(journal)
            await self._journal.finish(journal)
            m = replace(m, name=new_name)
        return Entry(path, m, self._catalogue.current(domain) == m.name)

    async def _rename(self, journal: JournalEntry) -> None:
        old, new, domain = journal.snapshot, journal.data["new_name"], journal.domain
        snapdir = Path(journal.data["snapdir"])
        m = manifest.Manifest.from_json(journal.data["manifest"], "<journal>")
        await self._journal.step(journal, "manifest")
        # What the agent recorded as the snapshot's own files follows its name
        # first: the renamed manifest names nothing the ledger does not allow.
        self._ledger.record(domain, new, snapdir, m.files())
        manifest.write(snapdir, replace(m, name=new))
        await self._journal.step(journal, "catalogue")
        self._catalogue.register(domain, new, snapdir)
        if self._catalogue.current(domain) == old:
            self._catalogue.set_current(domain, new)
        reparent(self._catalogue, domain, old, new)
        self._catalogue.unregister(domain, old)
        self._ledger.forget(domain, old)

    async def recover(self, journal: JournalEntry) -> str:
        """Finish a rename a dead agent left: all of it again (each step is idempotent)."""
        await self._rename(journal)
        return "completed"
