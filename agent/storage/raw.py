"""Raw images: no snapshots of their own, so an external snapshot is a copy
(reflink where the filesystem can) and a revert copies it back.

The copy is not made inside the guest's pause, which would then grow with
the disk. Inside it the disk is moved onto a throwaway qcow2 overlay (the
snapshot's instant: from then on the image does not change); after the
guest resumed the image is copied at the filesystem's speed, and the
overlay, holding what the guest wrote meanwhile, is merged back into the
image, where the guest goes on. QEMU's own point-in-time copy
(`blockdev-backup` sync=full) was tried first: a running backup job makes
the memory save fail at its end ("bdrv_inactivate_all() failed"), as QEMU
7.2 hands the disks over when a migration completes.

A hypervisor that cannot move a disk onto an overlay (Xen, whose libxl keeps
naming the image) gets the copy inside the pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from pathlib import Path

from .. import runner
from ..errors import InternalError, NotFound
from ..progress import StepProgress
from ..runner import Runner
from ..xldisk import DiskSpec
from . import qemu_img
from .base import BlockOps, DiskBackend, DiskRecord, Method
from .filecopy import copy_image


async def _copy(src: Path, dst: Path, vdev: str, progress: StepProgress) -> None:
    loop = asyncio.get_running_loop()

    def report(done: int, total: int, rate: float) -> None:
        loop.call_soon_threadsafe(functools.partial(progress, done / max(total, 1), done=done, total=total, rate=rate,
                                                    message=f"{vdev}: copying"))

    stop = threading.Event()
    copying = loop.run_in_executor(None, copy_image, src, dst, report, stop)
    try:
        await asyncio.shield(copying)
    except asyncio.CancelledError:
        # The thread cannot be cancelled from outside: tell it, and wait until
        # it has stopped and removed its half copy before rolling back.
        stop.set()
        with contextlib.suppress(Exception):
            await copying
        raise


TIMEOUT = 3600.0


def pending_overlay(record: DiskRecord) -> Path:
    """Where the guest's writes go while its image is copied: beside the copy."""
    copy = Path(record.file)
    return copy.with_name(f".{copy.name}.writes.qcow2")


class RawBackend(DiskBackend):
    name = "raw"
    formats = frozenset({"raw"})
    methods = frozenset({Method.EXTERNAL})
    default_method = Method.EXTERNAL

    def __init__(self, img: str = "qemu-img", run: Runner = runner.run) -> None:
        self._img = img
        self._run = run

    async def plan(self, disk: DiskSpec, method: Method, snapdir: Path, name: str) -> DiskRecord:
        if not Path(disk.target).is_file():
            raise NotFound(f"disk {disk.vdev}: image {disk.target} does not exist (raw files only)", vdev=disk.vdev,
                           path=disk.target)
        copy = snapdir / f"{disk.vdev}.raw"
        return DiskRecord(disk.vdev, disk.format, self.name, method, disk.target, file=str(copy))

    def copy_bytes(self, record: DiskRecord) -> int:
        # A sparse copy: the image's allocated bytes, not its size.
        return Path(record.image).stat().st_blocks * 512

    def copies(self, record: DiskRecord) -> list[Path]:
        return [Path(record.file)]

    async def take(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        # The guest is stopped and QEMU has drained its I/O, so the file
        # (through the page cache) holds exactly what the guest wrote.
        if block is not None and block.can_overlay(record.vdev):
            await block.external_snapshot(record.vdev, pending_overlay(record), "qcow2")
            progress(0.0, message=f"{record.vdev}: image frozen; copied once the guest runs")
        else:
            await _copy(Path(record.image), Path(record.file), record.vdev, progress)

    async def complete(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        overlay = pending_overlay(record)
        if not overlay.exists():
            return  # copied inside the pause
        if block is None:
            raise InternalError(f"disk {record.vdev}: the domain went away while its image was being copied")
        await _copy(Path(record.image), Path(record.file), record.vdev, progress)
        progress(1.0, message=f"{record.vdev}: merging what the guest wrote meanwhile")
        merging = asyncio.ensure_future(block.drop_overlay(record.vdev, Path(record.image), record.format))
        try:
            await asyncio.shield(merging)
        except asyncio.CancelledError:
            # A merge cut in half would leave the guest on the overlay: it
            # finishes, then the cancel rolls the copy back.
            await merging
            raise
        overlay.unlink()

    async def undo(self, record: DiskRecord, block: BlockOps | None) -> None:
        overlay = pending_overlay(record)
        if overlay.exists():
            # It holds the guest's writes since the instant: they go back into the image.
            if block is not None:
                await block.drop_overlay(record.vdev, Path(record.image), record.format)
            else:
                await self._run(qemu_img.commit(self._img, overlay), timeout=TIMEOUT)
            overlay.unlink()
        Path(record.file).unlink(missing_ok=True)

    def frozen_layers(self, record: DiskRecord) -> tuple[str, ...]:
        # The domain goes on writing its image; the copy is the snapshot.
        return (record.file,)

    async def delete(self, record: DiskRecord, block: BlockOps | None, active: bool) -> None:
        """Nothing lives inside a raw image; its copy is a file, which the caller removes."""

    async def check(self, record: DiskRecord, current: DiskSpec) -> None:
        if not Path(record.file).is_file():
            raise NotFound(f"disk {record.vdev}: the copy {record.file} is missing", vdev=record.vdev, file=record.file)

    async def revert(self, record: DiskRecord, current: DiskSpec, progress: StepProgress) -> DiskSpec:
        # Copy beside the target, then rename over it: a crash leaves either
        # the old image or the reverted one, never a half-copied disk.
        target = Path(current.target)
        tmp = target.with_name(f".{target.name}.domsnap-revert")
        tmp.unlink(missing_ok=True)
        await _copy(Path(record.file), tmp, record.vdev, progress)
        os.replace(tmp, target)
        return current
