"""LVM logical volumes (a domain's raw disk on /dev/VG/LV).

Internal: an LVM snapshot LV named `<lv>.<snapshot name>`. Thin volumes take
thin snapshots (no size; a snapshot of a snapshot is fine). Thick ones take
copy-on-write snapshots sized so they cannot overflow; LVM cannot snapshot a
thick snapshot, nor an origin while a merge runs, and those are refused at
plan time, before anything is touched. Either way lvcreate suspends the
device-mapper table around the snapshot, flushing what the guest wrote.

Revert, per LVM's rules: thin swaps in a new thin snapshot of the snapshot
under the LV's own name (the snapshot stays, so it can be reverted to again);
thick merges the snapshot into the origin (`lvconvert --merge`, which
consumes it) and then takes it again, so it stays revertable too.

External: a sparse copy of the LV into the snapshot directory, written back
over the LV on revert. The copy is not made inside the guest's pause: there
an LVM snapshot LV (`<lv>.<snapshot>.copy`) fixes the instant, and after the
resume the copy is read from it and it is dropped. Where LVM cannot
snapshot the LV (a thick snapshot, a type LVM refuses) the copy is made in
the pause, as nothing else can hold the instant.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
from pathlib import Path
from typing import Final

from .. import runner
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..progress import StepProgress
from ..runner import Runner
from ..xldisk import DiskSpec
from . import blockcopy, lvm_argv
from .base import BlockOps, DiskBackend, DiskRecord, Method
from .lvm_argv import LogicalVolume

log = logging.getLogger(__name__)

QUERY_TIMEOUT: Final = 60.0
# lvconvert --merge waits for the merge, which copies back every changed chunk.
MERGE_TIMEOUT: Final = 3600.0
REVERT_SUFFIX: Final = ".domsnap-revert"
# lvm2 lib/misc/lvm-string.c: names LVM keeps for itself.
_RESERVED_PREFIXES: Final = ("pvmove", "snapshot")
_RESERVED_PARTS: Final = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mimage", "_mlog", "_rimage", "_rmeta",
    "_tdata", "_tmeta", "_vdata", "_imeta", "_iorig", "_pmspare", "_vorigin",
)  # fmt: skip
_NAME_MAX: Final = 127
# Thick LV types (lv_attr bit 1) LVM can snapshot: plain, origin, mirror, raid.
_THICK_SNAPSHOTTABLE: Final = "-omMrR"
MiB: Final = 1 << 20


def is_logical_volume(path: str, sys_root: Path = Path("/sys")) -> bool:
    """Whether `path` is a block device that LVM maps (device-mapper uuid "LVM-...")."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    uuid = sys_root / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" / "dm" / "uuid"
    try:
        return uuid.read_text().startswith("LVM-")
    except OSError:
        return False


def cow_size(origin_bytes: int) -> int:
    """Copy-on-write space that never fills: the origin plus room for LVM's
    exception tables (LVM trims a request above the most it can use)."""
    return origin_bytes + origin_bytes // 64 + 4 * MiB


def snapshot_lv_name(lv: str, snapshot: str) -> str:
    name = f"{lv}.{snapshot}"
    if len(name) > _NAME_MAX:
        raise InvalidArgument(f"LVM snapshot name {name!r} is longer than {_NAME_MAX} characters")
    reserved = [p for p in _RESERVED_PREFIXES if name.startswith(p)] + [p for p in _RESERVED_PARTS if p in name]
    if reserved:
        raise InvalidArgument(f"LVM reserves names like {name!r} (it contains {reserved[0]!r}); "
                              "choose another snapshot name")
    return name


def _snapshot_device(record: DiskRecord) -> Path:
    """The device of a record's snapshot LV, beside its origin's (/dev/VG/LV)."""
    return Path(record.image).parent / record.tag


def _vg_and_lv(path: str) -> tuple[str, str]:
    """A record's image is the LV's canonical /dev/VG/LV path (set at plan time)."""
    p = Path(path)
    return p.parent.name, p.name


class LvmBackend(DiskBackend):
    name = "lvm"
    formats = frozenset({"raw"})
    methods = frozenset({Method.INTERNAL, Method.EXTERNAL})
    default_method = Method.INTERNAL

    def __init__(self, run: Runner = runner.run) -> None:
        self._run = run

    async def _report(self, what: str) -> list[LogicalVolume]:
        out = await self._run(lvm_argv.lvs(what), timeout=QUERY_TIMEOUT)
        return lvm_argv.parse_lvs(out.stdout)

    async def _lv(self, target: str, vdev: str) -> LogicalVolume:
        lvs = await self._report(target)
        if len(lvs) != 1:
            raise NotFound(f"disk {vdev}: {target} is not one LVM logical volume", vdev=vdev, path=target)
        return lvs[0]

    async def _vg(self, vg: str) -> dict[str, LogicalVolume]:
        return {lv.name: lv for lv in await self._report(vg)}

    async def plan(self, disk: DiskSpec, method: Method, snapdir: Path, name: str) -> DiskRecord:
        lv = await self._lv(disk.target, disk.vdev)
        if lv.partial:
            raise FailedPrecondition(f"disk {disk.vdev}: {lv.vg}/{lv.name} is missing physical volumes", vdev=disk.vdev)
        if lv.kind in "OS":
            raise FailedPrecondition(f"disk {disk.vdev}: a snapshot merge into {lv.vg}/{lv.name} is under way",
                                     vdev=disk.vdev)
        external = method is Method.EXTERNAL
        snap = snapshot_lv_name(lv.name, f"{name}.copy" if external else name)
        copy = str(snapdir / f"{disk.vdev}.raw") if external else ""
        if not lv.thin:
            why = ""
            if lv.kind == "s":
                why = (f"disk {disk.vdev}: {lv.vg}/{lv.name} is a thick snapshot, and LVM cannot snapshot a thick "
                       "snapshot (thin volumes can); use --external")
            elif lv.kind not in _THICK_SNAPSHOTTABLE:
                why = (f"disk {disk.vdev}: LVM cannot snapshot {lv.vg}/{lv.name} "
                       f"(volume type {lv.kind!r} in lv_attr {lv.attr})")
            elif lv.vg_free < cow_size(lv.size):
                why = (f"disk {disk.vdev}: volume group {lv.vg} has {lv.vg_free // MiB} MiB free; a snapshot of "
                       f"{lv.name} needs {cow_size(lv.size) // MiB} MiB")
            if why and external:
                log.info("%s: its copy is made inside the pause", why)
                return DiskRecord(disk.vdev, disk.format, self.name, method, lv.path, file=copy)
            if why:
                raise (ResourceExhausted if lv.kind in _THICK_SNAPSHOTTABLE else InvalidArgument)(why)
        if snap in await self._vg(lv.vg):
            raise AlreadyExists(f"disk {disk.vdev}: volume group {lv.vg} already has an LV named {snap!r}",
                                vdev=disk.vdev)
        return DiskRecord(disk.vdev, disk.format, self.name, method, lv.path, tag=snap, file=copy)

    def copy_bytes(self, record: DiskRecord) -> int:
        # The whole volume is read; zero blocks are left as holes, an upper bound.
        return blockcopy.device_size(Path(record.image)) if record.method is Method.EXTERNAL else 0

    def copies(self, record: DiskRecord) -> list[Path]:
        return [Path(record.file)] if record.method is Method.EXTERNAL else []

    async def take(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        if record.method is Method.EXTERNAL and not record.tag:
            await _copy(blockcopy.device_to_file, Path(record.image), Path(record.file), record.vdev, progress)
            return
        lv = await self._lv(record.image, record.vdev)
        size = None if lv.thin else cow_size(lv.size)
        # The copy is read from an external one's snapshot LV: it must be active.
        await self._run(lvm_argv.snapshot(lv.vg, lv.name, record.tag, size_bytes=size,
                                          activate=lv.thin and record.method is Method.EXTERNAL),
                        timeout=QUERY_TIMEOUT)
        progress(0.0 if record.method is Method.EXTERNAL else 1.0,
                 message=f"{record.vdev}: LVM snapshot {record.tag} taken")

    async def complete(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        if record.method is not Method.EXTERNAL or not record.tag:
            return
        await _copy(blockcopy.device_to_file, _snapshot_device(record), Path(record.file), record.vdev, progress)
        await self._drop(record)

    async def _drop(self, record: DiskRecord) -> None:
        vg, _lv = _vg_and_lv(record.image)
        if record.tag in await self._vg(vg):
            await self._run(lvm_argv.remove(vg, record.tag), timeout=QUERY_TIMEOUT)

    async def undo(self, record: DiskRecord, block: BlockOps | None) -> None:
        if record.method is Method.EXTERNAL:
            Path(record.file).unlink(missing_ok=True)
            if not record.tag:
                return
        await self._drop(record)

    def frozen_layers(self, record: DiskRecord) -> tuple[str, ...]:
        # The volume goes on; an external snapshot is a copy, a file of its own.
        return (record.file,) if record.method is Method.EXTERNAL else ()

    async def delete(self, record: DiskRecord, block: BlockOps | None, active: bool) -> None:
        # The snapshot LV is what lives "inside" the volume group for this record.
        if record.method is Method.INTERNAL:
            await self._drop(record)

    async def check(self, record: DiskRecord, current: DiskSpec) -> None:
        if os.path.realpath(current.target) != os.path.realpath(record.image):
            raise FailedPrecondition(f"disk {record.vdev}: the domain now uses {current.target}, not "
                                     f"{record.image} which the snapshot was taken of", vdev=record.vdev)
        vg, lv = _vg_and_lv(record.image)
        lvs = await self._vg(vg)
        if record.method is Method.EXTERNAL:
            copy = Path(record.file)
            if not copy.is_file():
                raise NotFound(f"disk {record.vdev}: the copy {record.file} is missing", vdev=record.vdev,
                               file=record.file)
            if lv in lvs and copy.stat().st_size != lvs[lv].size:
                raise FailedPrecondition(f"disk {record.vdev}: {vg}/{lv} was resized since the snapshot",
                                         vdev=record.vdev)
            return
        snap = lvs.get(record.tag)
        if snap is None:
            raise NotFound(f"disk {record.vdev}: the snapshot LV {vg}/{record.tag} is missing", vdev=record.vdev)
        if snap.invalid:
            raise NotFound(f"disk {record.vdev}: the snapshot LV {vg}/{record.tag} overflowed and is invalid",
                           vdev=record.vdev)
        if not snap.thin and lv not in lvs:
            raise NotFound(f"disk {record.vdev}: the origin LV {vg}/{lv} is missing", vdev=record.vdev)
        # A thick merge keeps the origin's other snapshots valid (the kernel
        # copies each chunk to them before overwriting it), and a thin swap
        # does not touch them: no other snapshot is harmed either way.

    async def revert(self, record: DiskRecord, current: DiskSpec, progress: StepProgress) -> DiskSpec:
        """After `check`: the domain is destroyed, so nothing holds the LV open."""
        if record.method is Method.EXTERNAL:
            await _copy(blockcopy.file_to_device, Path(record.file), Path(record.image), record.vdev, progress)
            return current
        vg, lv = _vg_and_lv(record.image)
        snap = (await self._vg(vg))[record.tag]
        if snap.thin:
            await self._swap_thin(vg, lv, record.tag)
        else:
            await self._merge_thick(vg, lv, record.tag, record.vdev)
        progress(1.0, message=f"{record.vdev}: {vg}/{lv} reverted to {record.tag}")
        return current

    async def _swap_thin(self, vg: str, lv: str, snap: str) -> None:
        """Replace the LV by a fresh thin snapshot of `snap`, under the LV's name.

        Each step can be re-run after a crash: a leftover new LV is made
        again, and if the old LV is already gone only the rename is left."""
        fresh = lv + REVERT_SUFFIX
        lvs = await self._vg(vg)
        if lv in lvs:
            if fresh in lvs:
                await self._run(lvm_argv.remove(vg, fresh), timeout=QUERY_TIMEOUT)
            await self._run(lvm_argv.snapshot(vg, snap, fresh, activate=True), timeout=QUERY_TIMEOUT)
            await self._run(lvm_argv.remove(vg, lv), timeout=QUERY_TIMEOUT)
        await self._run(lvm_argv.rename(vg, fresh, lv), timeout=QUERY_TIMEOUT)

    async def _merge_thick(self, vg: str, lv: str, snap: str, vdev: str) -> None:
        origin = (await self._vg(vg))[lv]
        await self._run(lvm_argv.merge(vg, snap), timeout=MERGE_TIMEOUT)
        if snap in await self._vg(vg):
            # LVM defers the merge to the origin's next activation while it is open.
            raise FailedPrecondition(f"disk {vdev}: LVM deferred merging {vg}/{snap}: {vg}/{lv} is still open",
                                     vdev=vdev)
        # The merge consumed the snapshot; take it again so it stays revertable.
        await self._run(lvm_argv.snapshot(vg, lv, snap, size_bytes=cow_size(origin.size)), timeout=QUERY_TIMEOUT)


async def _copy(copy: blockcopy.CopyFunction, src: Path, dst: Path, vdev: str, progress: StepProgress) -> None:
    loop = asyncio.get_running_loop()

    def report(done: int, total: int, rate: float) -> None:
        loop.call_soon_threadsafe(functools.partial(progress, done / max(total, 1), done=done, total=total, rate=rate,
                                                    message=f"{vdev}: copying"))

    await asyncio.to_thread(copy, src, dst, report)
