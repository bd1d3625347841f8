"""The vhd backend against a fake runner checking exact vhd-util argv and
replaying the recorded output in tests/data/vhd (reconstructed, see README)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent.errors import AlreadyExists, FailedPrecondition, InternalError, InvalidArgument, NotFound
from domsnap.agent.progress import ignore_progress
from domsnap.agent.storage import vhd_util
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.agent.storage.vhd import VhdBackend
from domsnap.agent.xldisk import DiskSpec
from tests.unit.xen_fakes import FakeRunner, Reply, recorded

BASE = "/srv/domsnap/images/web.vhd"


def run_async(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(main)


def test_argv() -> None:
    assert vhd_util.snapshot("vhd-util", "/s/xvda.vhd", BASE) == ["vhd-util", "snapshot", "-n", "/s/xvda.vhd",
                                                                  "-p", BASE]
    assert vhd_util.query("vhd-util", BASE) == ["vhd-util", "query", "-n", BASE, "-v", "-p", "-d"]
    assert vhd_util.create("/usr/sbin/vhd-util", BASE, 8192) == ["/usr/sbin/vhd-util", "create", "-n", BASE,
                                                                 "-s", "8192"]


def test_parse_query() -> None:
    assert vhd_util.parse_query(recorded("vhd/query-base.txt"), BASE) == vhd_util.VhdInfo(8192, None, 1)
    child = vhd_util.parse_query(recorded("vhd/query-child.txt"), "/srv/snap/web/s1/xvda.vhd")
    assert child == vhd_util.VhdInfo(8192, BASE, 2)
    with pytest.raises(ValueError, match="unexpected output"):
        vhd_util.parse_query(recorded("vhd/query-invalid.txt"), "/srv/domsnap/images/bad.vhd")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "web.vhd"
    path.write_bytes(b"conectix")
    return path


def query_reply(image: Path, name: str) -> Reply:
    return Reply(recorded(f"vhd/{name}").replace(BASE, str(image)))


def test_plan(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        run = FakeRunner([]).expect(["vhd-util", "query", "-n", str(image), "-v", "-p", "-d"],
                                    query_reply(image, "query-base.txt"))
        disk = DiskSpec(target=str(image), vdev="xvda", format="vhd")
        rec = await VhdBackend(run=run).plan(disk, Method.EXTERNAL, tmp_path / "s1", "s1")
        assert rec == DiskRecord("xvda", "vhd", "vhd", Method.EXTERNAL, str(image), file=str(tmp_path / "s1/xvda.vhd"))
        run.finished()

    run_async(main())


def test_no_internal_snapshots(image: Path) -> None:
    with pytest.raises(InvalidArgument, match="supports: external"):
        VhdBackend().choose(DiskSpec(target=str(image), vdev="xvda", format="vhd"), Method.INTERNAL)


def test_plan_refusals(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        disk = DiskSpec(target=str(image), vdev="xvda", format="vhd")
        with pytest.raises(NotFound):
            await VhdBackend(run=FakeRunner([])).plan(DiskSpec(target=str(tmp_path / "none.vhd"), vdev="xvda",
                                                               format="vhd"), Method.EXTERNAL, tmp_path, "s1")
        deep = FakeRunner([]).expect(vhd_util.query("vhd-util", image), query_reply(image, "query-child.txt"))
        with pytest.raises(FailedPrecondition, match="chain of 3 images, over the limit of 2"):
            await VhdBackend(run=deep, max_chain=2).plan(disk, Method.EXTERNAL, tmp_path, "s1")
        bad = FakeRunner([]).expect(vhd_util.query("vhd-util", image),
                                    Reply(rc=22, stdout=recorded("vhd/query-invalid.txt")))
        # vhd-util reports on stdout; the message carries it.
        with pytest.raises(InternalError, match=r"vhd-util query failed: error opening .*: -22"):
            await VhdBackend(run=bad).plan(disk, Method.EXTERNAL, tmp_path, "s1")
        (tmp_path / "s1").mkdir()
        (tmp_path / "s1" / "xvda.vhd").write_bytes(b"")
        taken = FakeRunner([]).expect(vhd_util.query("vhd-util", image), query_reply(image, "query-base.txt"))
        with pytest.raises(AlreadyExists):
            await VhdBackend(run=taken).plan(disk, Method.EXTERNAL, tmp_path / "s1", "s1")

    run_async(main())


class Block:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def internal_snapshot(self, vdev: str, tag: str) -> None:
        raise AssertionError("vhd has no internal snapshots")

    async def delete_internal_snapshot(self, vdev: str, tag: str) -> None:
        raise AssertionError("vhd has no internal snapshots")

    async def external_snapshot(self, vdev: str, overlay: Path, fmt: str) -> None:
        self.calls.append(("external", vdev, overlay, fmt))

    async def drop_overlay(self, vdev: str, backing: Path, fmt: str) -> None:
        self.calls.append(("drop", vdev, backing, fmt))

    async def commit(self, vdev: str, top: Path, base: Path) -> None:
        raise AssertionError("vhd layers are not merged")

    def can_overlay(self, vdev: str) -> bool:
        return True


def record_for(image: Path, snapdir: Path) -> DiskRecord:
    return DiskRecord("xvda", "vhd", "vhd", Method.EXTERNAL, str(image), file=str(snapdir / "xvda.vhd"))


def test_take_offline_and_through_the_hypervisor(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        rec = record_for(image, tmp_path)
        run = FakeRunner([]).expect(["vhd-util", "snapshot", "-n", rec.file, "-p", str(image)])
        await VhdBackend(run=run).take(rec, None, ignore_progress)
        run.finished()
        # A hypervisor holding the image moves the disk itself; vhd-util is not run.
        block = Block()
        await VhdBackend(run=FakeRunner([])).take(rec, block, ignore_progress)
        assert block.calls == [("external", "xvda", Path(rec.file), "vhd")]

    run_async(main())


def test_undo(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        rec = record_for(image, tmp_path)
        Path(rec.file).write_bytes(b"child")
        block = Block()
        await VhdBackend(run=FakeRunner([])).undo(rec, block)
        assert block.calls == [("drop", "xvda", image, "vhd")]
        assert not Path(rec.file).exists()
        await VhdBackend(run=FakeRunner([])).undo(rec, None)  # idempotent

    run_async(main())


def test_revert_makes_a_fresh_child_of_the_frozen_image(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        rec = record_for(image, tmp_path)
        current = DiskSpec(target=rec.file, vdev="xvda", format="vhd")
        (tmp_path / "xvda.r1.vhd").write_bytes(b"an earlier revert")
        fresh = tmp_path / "xvda.r2.vhd"
        run = FakeRunner([]).expect(["vhd-util", "snapshot", "-n", str(fresh), "-p", str(image)])
        now = await VhdBackend(run=run).revert(rec, current, ignore_progress)
        assert (now.target, now.format, now.vdev) == (str(fresh), "vhd", "xvda")
        run.finished()

    run_async(main())


def test_chain_follows_parents(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        child = "/srv/snap/web/s1/xvda.vhd"
        run = FakeRunner([])
        run.expect(vhd_util.query("vhd-util", child), Reply(recorded("vhd/query-child.txt")))
        run.expect(vhd_util.query("vhd-util", BASE), Reply(recorded("vhd/query-base.txt")))
        assert await VhdBackend(run=run).chain(child) == [child, BASE]
        run.finished()
        loop = FakeRunner([]).expect(vhd_util.query("vhd-util", BASE),
                                     Reply(recorded("vhd/query-child.txt")))
        with pytest.raises(FailedPrecondition, match="loops"):
            await VhdBackend(run=loop).chain(BASE)

    run_async(main())


def test_check(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        rec = record_for(image, tmp_path)
        current = DiskSpec(target=rec.file, vdev="xvda", format="vhd")
        await VhdBackend(run=FakeRunner([])).check(rec, current)
        image.unlink()
        with pytest.raises(NotFound, match="frozen image"):
            await VhdBackend(run=FakeRunner([])).check(rec, current)

    run_async(main())


def test_delete_leaves_files_to_the_caller(tmp_path: Path, image: Path) -> None:
    async def main() -> None:
        rec = record_for(image, tmp_path)
        Path(rec.file).write_bytes(b"child")
        await VhdBackend(run=FakeRunner([])).delete(rec, None, active=False)
        assert Path(rec.file).exists() and image.exists()

    run_async(main())
