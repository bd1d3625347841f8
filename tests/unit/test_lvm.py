"""The LVM backend against a fake runner checking exact lvs/lvcreate/lvconvert/
lvremove/lvrename argv and replaying the reports in tests/data/lvm
(reconstructed from lvm2's documentation, see README)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from domsnap.agent.progress import ignore_progress
from domsnap.agent.storage import blockcopy, lvm_argv
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.agent.storage.lvm import LvmBackend, cow_size, is_logical_volume, snapshot_lv_name
from domsnap.agent.xldisk import DiskSpec
from tests.unit.xen_fakes import FakeRunner, Reply, recorded

G = 1 << 30
MiB = 1 << 20
THIN = DiskSpec(target="/dev/vg0/pvguest-data", vdev="xvdb")
THICK = DiskSpec(target="/dev/vg1/web-root", vdev="xvda")
THIN_S1 = DiskRecord("xvdb", "raw", "lvm", Method.INTERNAL, "/dev/vg0/pvguest-data", tag="pvguest-data.s1")
THICK_S1 = DiskRecord("xvda", "raw", "lvm", Method.INTERNAL, "/dev/vg1/web-root", tag="web-root.s1")


def run_async(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(main)


def lvs(what: str, name: str) -> tuple[list[str], Reply]:
    return lvm_argv.lvs(what), Reply(recorded(f"lvm/{name}"))


def runner(*steps: tuple[list[str], Reply] | list[str]) -> FakeRunner:
    run = FakeRunner([])
    for step in steps:
        if isinstance(step, tuple):
            run.expect(list(step[0]), step[1])
        else:
            run.expect(list(step))
    return run


def test_argv() -> None:
    assert lvm_argv.lvs("/dev/vg0/pvguest-data") == [
        "lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
        "lv_name,vg_name,lv_attr,lv_size,segtype,pool_lv,origin,vg_free,lv_path", "/dev/vg0/pvguest-data"]
    assert lvm_argv.snapshot("vg0", "data", "data.s1") == ["lvcreate", "-s", "-n", "data.s1", "vg0/data"]
    assert lvm_argv.snapshot("vg1", "root", "root.s1", size_bytes=5 * G) == [
        "lvcreate", "-s", "-L", f"{5 * G}b", "-n", "root.s1", "vg1/root"]
    assert lvm_argv.snapshot("vg0", "data.s1", "tmp", activate=True) == [
        "lvcreate", "-s", "--setactivationskip", "n", "-n", "tmp", "vg0/data.s1"]
    assert lvm_argv.merge("vg1", "root.s1") == ["lvconvert", "--merge", "vg1/root.s1"]
    assert lvm_argv.remove("vg1", "root.s1") == ["lvremove", "-y", "vg1/root.s1"]
    assert lvm_argv.rename("vg0", "a", "b") == ["lvrename", "vg0", "a", "b"]


def test_parse_lvs() -> None:
    pool, data, snap = lvm_argv.parse_lvs(recorded("lvm/lvs-vg0-with-s1.json"))
    assert (pool.name, pool.kind, pool.thin) == ("pool0", "t", False)
    assert (data.name, data.vg, data.size, data.pool, data.thin, data.path) == (
        "pvguest-data", "vg0", 4 * G, "pool0", True, "/dev/vg0/pvguest-data")
    assert (snap.origin, snap.thin, snap.invalid) == ("pvguest-data", True, False)
    origin, bad = lvm_argv.parse_lvs(recorded("lvm/lvs-vg1-with-invalid-s1.json"))
    assert (origin.kind, origin.thin, bad.kind, bad.invalid) == ("o", False, "s", True)
    assert lvm_argv.parse_lvs(recorded("lvm/lvs-thick-lv.json"))[0].vg_free == 12 * G


def test_snapshot_names() -> None:
    assert snapshot_lv_name("web-root", "s1") == "web-root.s1"
    with pytest.raises(InvalidArgument, match="_tmeta"):
        snapshot_lv_name("web-root", "x_tmeta")
    with pytest.raises(InvalidArgument, match="snapshot"):
        snapshot_lv_name("snapshot-disk", "s1")
    with pytest.raises(InvalidArgument, match="longer than 127"):
        snapshot_lv_name("v" * 100, "s" * 30)


def test_cow_size_covers_the_whole_origin() -> None:
    assert cow_size(8 * G) == 8 * G + 128 * MiB + 4 * MiB


def test_plan_thin() -> None:
    async def main() -> None:
        run = runner(lvs(THIN.target, "lvs-thin-lv.json"), lvs("vg0", "lvs-vg0.json"))
        assert await LvmBackend(run).plan(THIN, Method.INTERNAL, Path("/s/pvguest/s1"), "s1") == THIN_S1
        run.finished()

    run_async(main())


def test_plan_thick() -> None:
    async def main() -> None:
        run = runner(lvs(THICK.target, "lvs-thick-lv.json"), lvs("vg1", "lvs-vg1.json"))
        assert await LvmBackend(run).plan(THICK, Method.INTERNAL, Path("/s/web/s1"), "s1") == THICK_S1
        run.finished()

    run_async(main())


def test_plan_external_is_a_copy_in_the_snapshot_directory_read_from_a_snapshot_lv() -> None:
    async def main() -> None:
        run = runner(lvs(THICK.target, "lvs-thick-lv.json"), lvs("vg1", "lvs-vg1.json"))
        rec = await LvmBackend(run).plan(THICK, Method.EXTERNAL, Path("/s/web/s1"), "s1")
        assert rec == DiskRecord("xvda", "raw", "lvm", Method.EXTERNAL, "/dev/vg1/web-root", tag="web-root.s1.copy",
                                 file="/s/web/s1/xvda.raw")
        run.finished()

    run_async(main())


@pytest.mark.parametrize(("disk", "report"), [
    (DiskSpec(target="/dev/vg1/web-root.s1", vdev="xvda"), "lvs-thick-snapshot-lv.json"),
    (THICK, "lvs-thick-lv-small-vg.json"),
])
def test_plan_external_copies_in_the_pause_where_lvm_cannot_snapshot(disk: DiskSpec, report: str) -> None:
    async def main() -> None:
        run = runner(lvs(disk.target, report))
        rec = await LvmBackend(run).plan(disk, Method.EXTERNAL, Path("/s/web/s1"), "s1")
        assert rec.tag == "" and rec.file == "/s/web/s1/xvda.raw"
        run.finished()

    run_async(main())


@pytest.mark.parametrize(
    ("disk", "report", "error", "message"),
    [
        # LVM cannot snapshot a thick snapshot: refused before anything is touched.
        (DiskSpec(target="/dev/vg1/web-root.s1", vdev="xvda"), "lvs-thick-snapshot-lv.json", InvalidArgument,
         "cannot snapshot a thick snapshot"),
        (THICK, "lvs-thick-lv-small-vg.json", ResourceExhausted, "2048 MiB free.*needs 8324 MiB"),
        (THICK, "lvs-merging-lv.json", FailedPrecondition, "merge into vg1/web-root is under way"),
    ],
)
def test_plan_refusals(disk: DiskSpec, report: str, error: type[Exception], message: str) -> None:
    async def main() -> None:
        run = runner(lvs(disk.target, report))
        with pytest.raises(error, match=message):
            await LvmBackend(run).plan(disk, Method.INTERNAL, Path("/s"), "s1")
        run.finished()  # one lvs, nothing else

    run_async(main())


def test_plan_refuses_a_taken_name() -> None:
    async def main() -> None:
        run = runner(lvs(THIN.target, "lvs-thin-lv.json"), lvs("vg0", "lvs-vg0-with-s1.json"))
        with pytest.raises(AlreadyExists, match=r"pvguest-data\.s1"):
            await LvmBackend(run).plan(THIN, Method.INTERNAL, Path("/s"), "s1")

    run_async(main())


def test_plan_refuses_a_disk_that_is_no_lv() -> None:
    async def main() -> None:
        run = runner((lvm_argv.lvs("/srv/a.img"), Reply('  {"report": [{"lv": []}]}\n')))
        with pytest.raises(NotFound, match="not one LVM logical volume"):
            await LvmBackend(run).plan(DiskSpec(target="/srv/a.img", vdev="xvda"), Method.INTERNAL, Path("/s"), "s1")

    run_async(main())


def test_take_thin_and_thick() -> None:
    async def main() -> None:
        run = runner(lvs(THIN_S1.image, "lvs-thin-lv.json"),
                     ["lvcreate", "-s", "-n", "pvguest-data.s1", "vg0/pvguest-data"],
                     lvs(THICK_S1.image, "lvs-thick-lv.json"),
                     ["lvcreate", "-s", "-L", f"{cow_size(8 * G)}b", "-n", "web-root.s1", "vg1/web-root"])
        await LvmBackend(run).take(THIN_S1, None, ignore_progress)
        await LvmBackend(run).take(THICK_S1, None, ignore_progress)
        run.finished()

    run_async(main())


def test_undo_and_delete_remove_the_snapshot_lv_once() -> None:
    async def main() -> None:
        run = runner(lvs("vg0", "lvs-vg0-with-s1.json"), ["lvremove", "-y", "vg0/pvguest-data.s1"],
                     lvs("vg0", "lvs-vg0.json"),
                     lvs("vg0", "lvs-vg0-with-s1.json"), ["lvremove", "-y", "vg0/pvguest-data.s1"])
        await LvmBackend(run).undo(THIN_S1, None)
        await LvmBackend(run).undo(THIN_S1, None)  # already gone: nothing run
        await LvmBackend(run).delete(THIN_S1, None, active=True)
        run.finished()

    run_async(main())


def test_check() -> None:
    async def main() -> None:
        await LvmBackend(runner(lvs("vg0", "lvs-vg0-with-s1.json"))).check(THIN_S1, THIN)
        with pytest.raises(NotFound, match="missing"):
            await LvmBackend(runner(lvs("vg0", "lvs-vg0.json"))).check(THIN_S1, THIN)
        with pytest.raises(NotFound, match="overflowed"):
            await LvmBackend(runner(lvs("vg1", "lvs-vg1-with-invalid-s1.json"))).check(THICK_S1, THICK)
        with pytest.raises(FailedPrecondition, match="now uses /dev/vg9/other"):
            await LvmBackend(FakeRunner([])).check(THICK_S1, DiskSpec(target="/dev/vg9/other", vdev="xvda"))

    run_async(main())


def test_revert_thin_swaps_in_a_fresh_snapshot_and_keeps_the_old() -> None:
    async def main() -> None:
        run = runner(lvs("vg0", "lvs-vg0-with-s1.json"), lvs("vg0", "lvs-vg0-with-s1.json"),
                     ["lvcreate", "-s", "--setactivationskip", "n", "-n", "pvguest-data.domsnap-revert",
                      "vg0/pvguest-data.s1"],
                     ["lvremove", "-y", "vg0/pvguest-data"],
                     ["lvrename", "vg0", "pvguest-data.domsnap-revert", "pvguest-data"])
        assert await LvmBackend(run).revert(THIN_S1, THIN, ignore_progress) == THIN
        run.finished()

    run_async(main())


def _vg0_after_a_crash_between_remove_and_rename() -> str:
    report = json.loads(recorded("lvm/lvs-vg0-with-s1.json"))
    lvs_ = report["report"][0]["lv"]
    for lv in lvs_:
        if lv["lv_name"] == "pvguest-data":
            lv["lv_name"], lv["origin"] = "pvguest-data.domsnap-revert", "pvguest-data.s1"
    return json.dumps(report)


def test_revert_thin_finishes_an_interrupted_swap() -> None:
    async def main() -> None:
        again = Reply(_vg0_after_a_crash_between_remove_and_rename())
        run = runner((lvm_argv.lvs("vg0"), again), (lvm_argv.lvs("vg0"), again),
                     ["lvrename", "vg0", "pvguest-data.domsnap-revert", "pvguest-data"])
        await LvmBackend(run).revert(THIN_S1, THIN, ignore_progress)
        run.finished()

    run_async(main())


def test_revert_thick_merges_then_takes_the_snapshot_again() -> None:
    async def main() -> None:
        run = runner(lvs("vg1", "lvs-vg1-with-s1.json"), lvs("vg1", "lvs-vg1-with-s1.json"),
                     ["lvconvert", "--merge", "vg1/web-root.s1"],
                     lvs("vg1", "lvs-vg1.json"),
                     ["lvcreate", "-s", "-L", f"{cow_size(8 * G)}b", "-n", "web-root.s1", "vg1/web-root"])
        assert await LvmBackend(run).revert(THICK_S1, THICK, ignore_progress) == THICK
        run.finished()

    run_async(main())


def test_revert_thick_refuses_a_deferred_merge() -> None:
    async def main() -> None:
        run = runner(lvs("vg1", "lvs-vg1-with-s1.json"), lvs("vg1", "lvs-vg1-with-s1.json"),
                     ["lvconvert", "--merge", "vg1/web-root.s1"], lvs("vg1", "lvs-vg1-with-s1.json"))
        with pytest.raises(FailedPrecondition, match="deferred"):
            await LvmBackend(run).revert(THICK_S1, THICK, ignore_progress)
        run.finished()  # and no lvcreate over a snapshot still merging

    run_async(main())


# ------------------------------------------------------------ external


def _volume(tmp_path: Path) -> Path:
    """A regular file standing in for the LV (lseek(SEEK_END) sizes both alike)."""
    vg = tmp_path / "vgX"
    vg.mkdir()
    lv = vg / "lv"
    with open(lv, "wb") as f:
        f.write(b"A" * MiB)
        f.seek(9 * MiB)
        f.write(b"B" * MiB)
        f.truncate(12 * MiB)
    return lv


def test_external_copy_and_copy_back(tmp_path: Path) -> None:
    async def main() -> None:
        lv = _volume(tmp_path)
        before = lv.read_bytes()
        rec = DiskRecord("xvda", "raw", "lvm", Method.EXTERNAL, str(lv), file=str(tmp_path / "xvda.raw"))
        backend = LvmBackend(FakeRunner([]))
        events: list[float] = []
        await backend.take(rec, None, lambda f, **_: events.append(f))
        copy = Path(rec.file)
        assert copy.read_bytes() == before
        assert copy.stat().st_blocks * 512 < 4 * MiB  # the zeros stayed holes
        assert events and events[-1] == 1.0
        with open(lv, "r+b") as f:
            f.write(b"C" * (12 * MiB))
        report = Reply(json.dumps({"report": [{"lv": [{
            "lv_name": "lv", "vg_name": "vgX", "lv_attr": "-wi-a-----", "lv_size": str(12 * MiB),
            "segtype": "linear", "pool_lv": "", "origin": "", "vg_free": "0", "lv_path": str(lv)}]}]}))
        current = DiskSpec(target=str(lv), vdev="xvda")
        await LvmBackend(runner((lvm_argv.lvs("vgX"), report))).check(rec, current)
        assert await backend.revert(rec, current, ignore_progress) == current
        assert lv.read_bytes() == before
        await backend.undo(rec, None)
        assert not copy.exists()

    run_async(main())


def test_copy_back_refuses_a_resized_volume(tmp_path: Path) -> None:
    lv = _volume(tmp_path)
    copy = tmp_path / "xvda.raw"
    copy.write_bytes(b"x" * MiB)
    with pytest.raises(FailedPrecondition, match="resized"):
        blockcopy.file_to_device(copy, lv, lambda *_: None)
    assert lv.stat().st_size == 12 * MiB


def test_copy_refuses_an_existing_destination(tmp_path: Path) -> None:
    lv = _volume(tmp_path)
    (tmp_path / "xvda.raw").write_bytes(b"")
    with pytest.raises(AlreadyExists):
        blockcopy.device_to_file(lv, tmp_path / "xvda.raw", lambda *_: None)


def test_is_logical_volume(tmp_path: Path) -> None:
    assert not is_logical_volume(str(_volume(tmp_path)))  # a regular file
    assert not is_logical_volume(str(tmp_path / "missing"))
    # A block device that is not device-mapper (or no sysfs entry for it).
    loops = [p for p in ("/dev/loop0", "/dev/sda", "/dev/vda") if os.path.exists(p)]
    for dev in loops:
        assert not is_logical_volume(dev, sys_root=tmp_path)


def _report(lv: Path, *names: str) -> Reply:
    return Reply(json.dumps({"report": [{"lv": [{
        "lv_name": name, "vg_name": lv.parent.name, "lv_attr": "-wi-a-----", "lv_size": str(12 * MiB),
        "segtype": "linear", "pool_lv": "", "origin": "", "vg_free": str(64 * MiB), "lv_path": str(lv.parent / name)}
        for name in names]}]}))


def test_external_copy_is_read_after_the_pause_from_the_snapshot_lv(tmp_path: Path) -> None:
    """take (in the pause) makes the snapshot LV, the guest writes on, complete
    (after the resume) copies the instant from the snapshot LV and drops it."""
    async def main() -> None:
        lv = _volume(tmp_path)
        instant = lv.read_bytes()
        snap = lv.parent / "lv.s1.copy"

        async def lvcreate(argv: Sequence[str]) -> None:
            snap.write_bytes(lv.read_bytes())

        async def lvremove(argv: Sequence[str]) -> None:
            snap.unlink()

        vg = lv.parent.name
        run = runner(
            (lvm_argv.lvs(str(lv)), _report(lv, "lv")),
            (["lvcreate", "-s", "-L", f"{cow_size(12 * MiB)}b", "-n", "lv.s1.copy", f"{vg}/lv"],
             Reply(action=lvcreate)),
            (lvm_argv.lvs(vg), _report(lv, "lv", "lv.s1.copy")),
            (["lvremove", "-y", f"{vg}/lv.s1.copy"], Reply(action=lvremove)),
            (lvm_argv.lvs(vg), _report(lv, "lv")),
        )
        backend = LvmBackend(run)
        rec = DiskRecord("xvda", "raw", "lvm", Method.EXTERNAL, str(lv), tag="lv.s1.copy",
                         file=str(tmp_path / "xvda.raw"))
        await backend.take(rec, None, ignore_progress)
        assert not Path(rec.file).exists(), "copied inside the pause"
        with open(lv, "r+b") as f:  # the guest runs again
            f.write(b"C" * MiB)
        await backend.complete(rec, None, ignore_progress)
        assert Path(rec.file).read_bytes() == instant
        assert not snap.exists()
        await backend.undo(rec, None)  # the snapshot LV is gone already: only the copy goes
        assert not Path(rec.file).exists()
        run.finished()

    run_async(main())


def test_an_external_copys_thin_snapshot_lv_is_made_active() -> None:
    async def main() -> None:
        rec = DiskRecord("xvdb", "raw", "lvm", Method.EXTERNAL, THIN.target, tag="pvguest-data.s1.copy",
                         file="/s/xvdb.raw")
        run = runner(lvs(THIN.target, "lvs-thin-lv.json"),
                     ["lvcreate", "-s", "--setactivationskip", "n", "-n", "pvguest-data.s1.copy", "vg0/pvguest-data"])
        await LvmBackend(run).take(rec, None, ignore_progress)
        run.finished()

    run_async(main())
