"""snapshot-edit in-process, on a real catalogue and real manifests (no
guest: a rename touches no disk): a rename where no disk holds the name,
the refusal where one does, and an agent killed at each step of a rename
finishing it on restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import manifest
from domsnap.agent.catalogue import Catalogue
from domsnap.agent.convert import snapshot_listing
from domsnap.agent.errors import AlreadyExists, FailedPrecondition
from domsnap.agent.journal import Journal, JournalEntry
from domsnap.agent.ledger import Ledger
from domsnap.agent.manifest import Manifest
from domsnap.agent.snapshot_edit import SnapshotEdit
from domsnap.agent.storage.base import DiskRecord, Method


def snap(tmp: Path, cat: Catalogue, name: str, parent: str = "", tag: str = "") -> Path:
    path = tmp / "snaps" / name
    path.mkdir(parents=True)
    method = Method.INTERNAL if tag else Method.EXTERNAL
    disk = DiskRecord("xvda", "qcow2", "qcow2", method, "/img/web.qcow2", tag=tag,
                      file="" if tag else str(path / "xvda.qcow2"))
    created = float(len(cat.entries("web")))  # listings are oldest first
    manifest.write(path, Manifest(name, "web", "", created, created, "running", False, 'name = "web"\n', (disk,),
                                  str(path / "memory.save"), 1, "qemu", "QEMU 7.2", parent=parent))
    cat.register("web", name, path)
    cat.set_current("web", name)
    return path


def state(cat: Catalogue) -> list[tuple[str, str, bool]]:
    return [(e.manifest.name, e.manifest.parent, e.current) for e in cat.entries("web")]


def test_rename_and_the_refusal_where_a_disk_holds_the_name(tmp_path: Path) -> None:
    cat = Catalogue(tmp_path / "state", snapshot_listing)
    ledger = Ledger(tmp_path / "state")
    edit = SnapshotEdit(cat, Journal(tmp_path / "state"), ledger)
    snap(tmp_path, cat, "e1")
    snap(tmp_path, cat, "c1", parent="e1")
    snap(tmp_path, cat, "i1", parent="c1", tag="i1")
    with pytest.raises(FailedPrecondition, match=r"its disks hold the name \(xvda \(qcow2 i1\)\)"):
        asyncio.run(edit.edit("web", "i1", description=None, new_name="i2", request_id="r"))
    with pytest.raises(AlreadyExists) as taken:
        asyncio.run(edit.edit("web", "e1", description=None, new_name="c1", request_id="r"))
    assert (taken.value.reason, taken.value.metadata) == ("SNAPSHOT_EXISTS", {"domain": "web", "snapshot": "c1"})
    before = state(cat)
    assert before == [("e1", "", False), ("c1", "e1", False), ("i1", "c1", True)]
    c1 = cat.resolve("web", "c1")
    ledger.record("web", "c1", c1[0], c1[1].files())  # the frozen /img/web.qcow2 lies outside its folder
    entry = asyncio.run(edit.edit("web", "c1", description="renamed", new_name="c2", request_id="r"))
    ledger.check(entry.path, entry.manifest, "revert to")  # what the agent recorded followed the name
    assert (entry.manifest.name, entry.manifest.description) == ("c2", "renamed")
    assert state(cat) == [("e1", "", False), ("c2", "e1", False), ("i1", "c2", True)]
    assert cat.path_of("web", "c1") is None and cat.path_of("web", "c2") == tmp_path / "snaps" / "c1"
    assert not list((tmp_path / "state" / "journal").iterdir())


# "begin": the entry written, no step yet; "manifest", "catalogue": killed
# right after journaling that step, before it ran.
@pytest.mark.parametrize("killed_after", ["begin", "manifest", "catalogue"])
def test_a_rename_cut_short_is_finished_on_restart(tmp_path: Path, killed_after: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalogue(tmp_path / "state", snapshot_listing)
    journal = Journal(tmp_path / "state")
    snap(tmp_path, cat, "a")
    snap(tmp_path, cat, "b", parent="a")

    class Killed(Exception):
        pass

    # What a kill -9 right after journaling a step leaves: the entry, and the step not run.
    real_step = journal.step

    async def step(entry: JournalEntry, name: str, **data: Any) -> None:
        if killed_after == "begin":
            raise Killed
        await real_step(entry, name, **data)
        if name == killed_after:
            raise Killed

    monkeypatch.setattr(journal, "step", step)
    with pytest.raises(Killed):
        asyncio.run(SnapshotEdit(cat, journal, Ledger(tmp_path / "state")).edit(
            "web", "a", description=None, new_name="z", request_id="r"))
    monkeypatch.undo()
    # A new agent: its own catalogue, the journal on disk.
    (pending,) = journal.pending()
    again = SnapshotEdit(Catalogue(tmp_path / "state", snapshot_listing), journal, Ledger(tmp_path / "state"))
    assert asyncio.run(again.recover(pending)) == "completed"
    asyncio.run(journal.finish(pending))
    assert state(Catalogue(tmp_path / "state", snapshot_listing)) == [("z", "", False), ("b", "z", True)]
