"""VHD images: no internal snapshots; an external one is a differencing child
(`vhd-util snapshot`) the domain goes on with, its parent frozen from then on.
A revert makes a fresh child of the frozen parent, so later snapshots stay intact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import runner
from ..errors import AlreadyExists, CommandError, FailedPrecondition, InternalError, NotFound
from ..progress import StepProgress
from ..runner import CommandResult, Runner
from ..xldisk import DiskSpec
from . import vhd_util
from .base import (
    BlockOps,
    DiskBackend,
    DiskRecord,
    Method,
    fresh_revert_layer,
    named_as_revert_layer,
)

TIMEOUT = 120.0


class VhdBackend(DiskBackend):
    name = "vhd"
    formats = frozenset({"vhd"})
    methods = frozenset({Method.EXTERNAL})
    default_method = Method.EXTERNAL

    def __init__(self, binary: str = vhd_util.VHD_UTIL, run: Runner = runner.run, max_chain: int = 32) -> None:
        self._bin = binary
        self._run = run
        self._max_chain = max_chain

    async def _vhd_util(self, argv: list[str]) -> CommandResult:
        try:
            return await self._run(argv, timeout=TIMEOUT)
        except CommandError as err:
            # vhd-util reports its errors on stdout.
            detail = err.stdout.strip() or err.stderr.strip() or f"exit status {err.rc}"
            raise InternalError(f"vhd-util {argv[1]} failed: {detail}") from err

    async def _query(self, image: str) -> vhd_util.VhdInfo:
        out = await self._vhd_util(vhd_util.query(self._bin, image))
        return vhd_util.parse_query(out.stdout, image)

    async def plan(self, disk: DiskSpec, method: Method, snapdir: Path, name: str) -> DiskRecord:
        if not Path(disk.target).is_file():
            raise NotFound(f"disk {disk.vdev}: image {disk.target} does not exist", vdev=disk.vdev, path=disk.target)
        # Fails on anything that is not a readable VHD, before anything is made.
        depth = (await self._query(disk.target)).depth + 1
        if depth > self._max_chain:
            raise FailedPrecondition(
                f"disk {disk.vdev}: an external snapshot would make a VHD chain of {depth} images, over the "
                f"limit of {self._max_chain} (max_chain_depth); delete older snapshots first", vdev=disk.vdev)
        child = snapdir / f"{disk.vdev}.vhd"
        if child.exists():
            raise AlreadyExists(f"disk {disk.vdev}: {child} already exists", reason="PATH_EXISTS", vdev=disk.vdev,
                                path=str(child))
        return DiskRecord(disk.vdev, disk.format, self.name, method, disk.target, file=str(child))

    async def take(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        if block is not None:
            # The hypervisor holds the image: only it can move the disk onto the child.
            await block.external_snapshot(record.vdev, Path(record.file), "vhd")
        else:
            await self._vhd_util(vhd_util.snapshot(self._bin, record.file, record.image))
        progress(1.0, message=f"{record.vdev}: child {Path(record.file).name} created")

    async def undo(self, record: DiskRecord, block: BlockOps | None) -> None:
        child = Path(record.file)
        if block is not None and child.exists():
            await block.drop_overlay(record.vdev, Path(record.image), record.format)
        child.unlink(missing_ok=True)

    async def delete(self, record: DiskRecord, block: BlockOps | None, active: bool) -> None:
        """Nothing lives inside a VHD for a record; its child is a file, which the caller removes."""

    def overlays(self, record: DiskRecord) -> list[Path]:
        return [Path(record.file)]

    def is_revert_layer(self, path: Path, vdev: str) -> bool:
        return named_as_revert_layer(path, vdev, ".vhd")

    async def chain(self, image: str) -> list[str]:
        images = [image]
        while (parent := (await self._query(images[-1])).parent) is not None:
            if parent in images or len(images) > self._max_chain:
                raise FailedPrecondition(f"{image}: its VHD parent chain loops or is deeper than {self._max_chain}")
            images.append(parent)
        return images

    async def check(self, record: DiskRecord, current: DiskSpec) -> None:
        # A revert only adds a fresh child of the frozen image: nothing else is touched.
        if not Path(record.image).is_file():
            raise NotFound(f"disk {record.vdev}: the frozen image {record.image} is missing", vdev=record.vdev,
                           path=record.image)

    async def revert(self, record: DiskRecord, current: DiskSpec, progress: StepProgress) -> DiskSpec:
        fresh = fresh_revert_layer(Path(record.file))
        await self._vhd_util(vhd_util.snapshot(self._bin, fresh, record.image))
        progress(1.0, message=f"{record.vdev}: new child {fresh.name}")
        return dataclasses.replace(current, target=str(fresh), format="vhd")
