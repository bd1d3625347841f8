"""The catalogue's SQLite index on real files: paging (AIP-158) and the
domain filter, and the check on start that rebuilds a deleted, corrupt or
out-of-date index from the manifests."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import sqlite3
from pathlib import Path

import pytest

from domsnap.agent import manifest
from domsnap.agent.catalogue import Catalogue
from domsnap.agent.catalogue_index import FILE, CatalogueIndex, Row
from domsnap.agent.convert import snapshot_listing, snapshot_page
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.manifest import Manifest
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.v1 import domsnap_pb2 as pb


def make(root: Path, domain: str, name: str, created: float, parent: str = "") -> Path:
    d = root / domain / name
    d.mkdir(parents=True)
    (d / manifest.MEMORY).write_bytes(b"\0" * 4096)
    manifest.write(d, Manifest(
        name=name, domain=domain, description=f"about {name}", created_at=created, finished_at=created + 1,
        state="running", live=False, domain_config=f'name = "{domain}"\n',
        disks=(DiskRecord("xvda", "qcow2", "qcow2", Method.INTERNAL, f"/img/{domain}.qcow2", tag=name),),
        memory_file=str(d / manifest.MEMORY), memory_bytes=4096, driver="qemu", hypervisor_version="QEMU 7.2.22",
        parent=parent,
    ))
    return d


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Path]:
    """A state dir whose catalogue has a: 25 snapshots, b: 3, registered through the catalogue."""
    state, root = tmp_path / "state", tmp_path / "snaps"
    cat = Catalogue(state, snapshot_listing)
    # Creation times out of name order: the listing goes by time.
    for domain, count in (("b", 3), ("a", 25)):
        for i in range(count):
            name = f"s{i:02d}"
            cat.register(domain, name, make(root, domain, name, 1000.0 + (count - i) * 10))
    cat.set_current("a", "s07")
    cat.close()
    return state, root


def listing(cat: Catalogue, domain: str, size: int) -> list[list[pb.Snapshot]]:
    pages, token = [], ""
    while True:
        resp = snapshot_page(cat.page(domain, size, token, 1 << 20), full=True)
        pages.append(list(resp.snapshots))
        if not (token := resp.next_page_token):
            return pages


def names(pages: list[list[pb.Snapshot]]) -> list[str]:
    return [f"{s.domain}/{s.name}" for page in pages for s in page]


A_ORDER = [f"a/s{i:02d}" for i in reversed(range(25))]
B_ORDER = [f"b/s{i:02d}" for i in reversed(range(3))]


def test_pages_in_order_with_the_domain_filter_server_side(filled: tuple[Path, Path]) -> None:
    cat = Catalogue(filled[0], snapshot_listing)
    pages = listing(cat, "a", 10)
    assert [len(p) for p in pages] == [10, 10, 5]
    assert names(pages) == A_ORDER
    assert [s.name for p in pages for s in p if s.current] == ["s07"]
    assert names(listing(cat, "", 7)) == A_ORDER + B_ORDER
    # The listing carries what GetSnapshot gives, from the index alone.
    first = pages[0][0]
    assert first.description == "about s24" and first.memory.size_bytes == 4096 and first.size_bytes >= 4096
    assert first.disks[0].tag == "s24" and first.path.endswith("/a/s24")


def test_a_page_stops_early_at_its_byte_cap_and_says_more_follow(filled: tuple[Path, Path]) -> None:
    cat = Catalogue(filled[0], snapshot_listing)
    page = cat.page("a", 1000, "", 1)
    assert len(page.snapshots) == 1 and page.next_token


def test_a_token_from_another_filter_or_forged_is_refused(filled: tuple[Path, Path]) -> None:
    cat = Catalogue(filled[0], snapshot_listing)
    token = cat.page("a", 5, "", 1 << 20).next_token
    with pytest.raises(InvalidArgument, match="another filter"):
        cat.page("b", 5, token, 1 << 20)
    with pytest.raises(InvalidArgument, match="not one this agent gave out"):
        cat.page("a", 5, "!!not-a-token", 1 << 20)


def test_register_and_unregister_keep_the_index_in_step(filled: tuple[Path, Path]) -> None:
    state, root = filled
    cat = Catalogue(state, snapshot_listing)
    cat.unregister("a", "s03")
    cat.register("c", "new", make(root, "c", "new", 5.0))
    assert "a/s03" not in names(listing(cat, "a", 100))
    assert names(listing(cat, "c", 100)) == ["c/new"]
    assert cat.check() == 0, "the index was out of step after register/unregister"


def test_a_deleted_index_is_rebuilt_on_start(filled: tuple[Path, Path]) -> None:
    state, _ = filled
    (state / FILE).unlink()
    cat = Catalogue(state, snapshot_listing)
    assert cat.check() == 28
    assert names(listing(cat, "", 100)) == A_ORDER + B_ORDER
    assert Catalogue(state, snapshot_listing).check() == 0


def test_a_snapshot_is_found_by_its_uid_also_after_a_rebuild(filled: tuple[Path, Path]) -> None:
    """The uid a manifest without one gets (derived from what never changes) finds it too."""
    state, root = filled
    cat = Catalogue(state, snapshot_listing)
    [snap] = [s for page in listing(cat, "b", 100) for s in page if s.name == "s01"]
    assert cat.path_of_uid(snap.uid) == str(root / "b" / "s01")
    assert cat.path_of_uid("nosuch") is None
    cat.close()
    (state / FILE).unlink()
    rebuilt = Catalogue(state, snapshot_listing)
    assert rebuilt.check() == 28
    assert rebuilt.path_of_uid(snap.uid) == str(root / "b" / "s01")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_corrupt_index_is_rebuilt_on_start(filled: tuple[Path, Path], damage: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    state, _ = filled
    index = state / FILE
    if damage == "garbage":
        index.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        data = index.read_bytes()
        index.write_bytes(data[: len(data) // 2])
    else:
        index.unlink()
        with sqlite3.connect(index) as db:
            db.execute("CREATE TABLE other (x)")
            db.execute("PRAGMA user_version = 99")
    with caplog.at_level(logging.WARNING, logger="domsnap.agent.catalogue_index"):
        cat = Catalogue(state, snapshot_listing)
    assert "unusable" in caplog.text
    assert cat.check() == 28
    assert names(listing(cat, "", 100)) == A_ORDER + B_ORDER


def test_an_out_of_date_index_is_brought_up_to_the_manifests(filled: tuple[Path, Path]) -> None:
    """Changes the agent did not see (a manifest rewritten, a snapshot
    registered or unregistered behind the index's back, as a crash between
    the two can leave) are found on start."""
    state, root = filled
    d = root / "a" / "s05"
    m = manifest.read(d)
    manifest.write(d, dataclasses.replace(m, description="rewritten", parent="s09"))
    (state / "catalogue" / "b" / "s01").unlink()
    make(root, "b", "late", 1.0)
    (state / "catalogue" / "b" / "late").write_text(f"{root / 'b' / 'late'}\n")
    cat = Catalogue(state, snapshot_listing)
    stale = {s.name: s for s in listing(cat, "a", 100)[0]}["s05"]
    assert stale.description == "about s05"
    assert cat.check() == 3
    fresh = {s.name: s for s in listing(cat, "a", 100)[0]}["s05"]
    assert (fresh.description, fresh.parent) == ("rewritten", "s09")
    assert names(listing(cat, "b", 100)) == ["b/late", "b/s02", "b/s00"]


def test_a_registered_snapshot_whose_manifest_is_gone_is_left_out(filled: tuple[Path, Path]) -> None:
    state, root = filled
    (root / "b" / "s00" / manifest.MANIFEST).unlink()
    cat = Catalogue(state, snapshot_listing)
    assert cat.check() == 1
    assert names(listing(cat, "b", 100)) == ["b/s02", "b/s01"]


def test_the_index_takes_writers_and_readers_from_several_threads(tmp_path: Path) -> None:
    """Operations on different domains write the index from their own threads
    while the event loop reads pages from it."""
    index = CatalogueIndex(tmp_path)

    def write(domain: str) -> None:
        for i in range(300):
            index.update(put=[Row(domain, f"s{i:03d}", "/p", float(i), "", b"x" * 64, f"u{i}")])

    def read() -> None:
        for _ in range(300):
            index.page("", None, 50, 1 << 20)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for done in [pool.submit(write, "x"), pool.submit(write, "y"), pool.submit(read)]:
            done.result()
    assert len(index.stamps()) == 600
