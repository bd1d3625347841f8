"""qcow2 images: internal snapshots (a tag in the image) and external ones (an
overlay the domain goes on with; the image below is frozen)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from .. import runner
from ..errors import AlreadyExists, FailedPrecondition, NotFound
from ..progress import StepProgress
from ..runner import Runner
from ..xldisk import DiskSpec
from . import qcow2_tags, qemu_img
from .base import (
    BlockOps,
    DiskBackend,
    DiskRecord,
    Method,
    fresh_revert_layer,
    named_as_revert_layer,
)

TIMEOUT = 120.0
# An offline merge writes a whole layer's data.
MERGE_TIMEOUT = 3600.0


class Qcow2Backend(DiskBackend):
    name = "qcow2"
    formats = frozenset({"qcow2"})
    methods = frozenset({Method.INTERNAL, Method.EXTERNAL})
    default_method = Method.INTERNAL

    def __init__(self, img: str = "qemu-img", run: Runner = runner.run, max_chain: int = 32) -> None:
        self._img = img
        self._run = run
        self._max_chain = max_chain

    async def tags(self, image: str) -> list[str]:
        if (tags := await asyncio.to_thread(qcow2_tags.read_tags, image)) is not None:
            return tags
        out = await self._run(qemu_img.info(self._img, image), timeout=TIMEOUT)
        return qemu_img.snapshot_tags(qemu_img.parse_info(out.stdout))

    async def plan(self, disk: DiskSpec, method: Method, snapdir: Path, name: str) -> DiskRecord:
        if not Path(disk.target).is_file():
            raise NotFound(f"disk {disk.vdev}: image {disk.target} does not exist", vdev=disk.vdev, path=disk.target)
        if method is Method.INTERNAL:
            if name in await self.tags(disk.target):
                raise AlreadyExists(f"disk {disk.vdev}: {disk.target} already has a snapshot tagged {name!r}",
                                    vdev=disk.vdev, path=disk.target)
            return DiskRecord(disk.vdev, disk.format, self.name, method, disk.target, tag=name)
        depth = len(await self.chain(disk.target)) + 1
        if depth > self._max_chain:
            raise FailedPrecondition(
                f"disk {disk.vdev}: an external snapshot would make a backing chain of {depth} images, over the "
                f"limit of {self._max_chain} (max_chain_depth); delete older snapshots (snapshot-delete merges their "
                "layers) or use --internal", vdev=disk.vdev)
        overlay = snapdir / f"{disk.vdev}.qcow2"
        return DiskRecord(disk.vdev, disk.format, self.name, method, disk.target, file=str(overlay))

    async def take(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        if record.method is Method.INTERNAL:
            if block is not None:
                await block.internal_snapshot(record.vdev, record.tag)
            else:
                await self._run(qemu_img.snapshot_create(self._img, record.image, record.tag), timeout=TIMEOUT)
        elif block is not None:
            await block.external_snapshot(record.vdev, Path(record.file), "qcow2")
        else:
            await self._run(qemu_img.create_overlay(self._img, record.file, record.image, record.format),
                            timeout=TIMEOUT)
        progress(1.0, message=f"{record.vdev}: {record.method} snapshot taken")

    async def undo(self, record: DiskRecord, block: BlockOps | None) -> None:
        if record.method is Method.INTERNAL:
            if record.tag not in await self.tags(record.image):
                return
            if block is not None:
                await block.delete_internal_snapshot(record.vdev, record.tag)
            else:
                await self._run(qemu_img.snapshot_delete(self._img, record.image, record.tag), timeout=TIMEOUT)
            return
        overlay = Path(record.file)
        if block is not None and overlay.exists():
            await block.drop_overlay(record.vdev, Path(record.image), record.format)
        overlay.unlink(missing_ok=True)

    async def revert(self, record: DiskRecord, current: DiskSpec, progress: StepProgress) -> DiskSpec:
        if record.method is Method.INTERNAL:
            await self._run(qemu_img.snapshot_apply(self._img, record.image, record.tag), timeout=TIMEOUT)
            progress(1.0, message=f"{record.vdev}: tag {record.tag} applied")
            return current
        # A fresh overlay over the frozen image: the overlays of later
        # snapshots (which may have this image below them) stay untouched.
        fresh = fresh_revert_layer(Path(record.file))
        await self._run(qemu_img.create_overlay(self._img, fresh, record.image, record.format), timeout=TIMEOUT)
        progress(1.0, message=f"{record.vdev}: new overlay {fresh.name}")
        return dataclasses.replace(current, target=str(fresh), format="qcow2")

    def overlays(self, record: DiskRecord) -> list[Path]:
        return [Path(record.file)] if record.method is Method.EXTERNAL else []

    def is_revert_layer(self, path: Path, vdev: str) -> bool:
        return named_as_revert_layer(path, vdev, ".qcow2")

    def mergeable(self, record: DiskRecord) -> bool:
        return record.method is Method.EXTERNAL

    async def merge(self, record: DiskRecord, block: BlockOps | None, top: str | None, children: list[str]) -> None:
        layer, below = record.file, record.image
        if top is not None and block is not None:
            chain = await self.chain(top)
            if layer not in chain:
                return  # merged already
            if chain[0] == layer:
                await block.drop_overlay(record.vdev, Path(below), record.format)
            else:
                await block.commit(record.vdev, Path(layer), Path(below))
            return
        # Offline: the data first, then the layers above, which read the same
        # data through `below` from then on (a crash in between leaves them
        # reading it through the layer: the same bytes either way).
        above = [c for c in children if (await self.chain(c))[1:2] == [layer]]
        if not above:
            return
        await self._run(qemu_img.commit(self._img, layer), timeout=MERGE_TIMEOUT)
        for child in above:
            await self._run(qemu_img.rebase_unsafe(self._img, child, below, record.format), timeout=TIMEOUT)

    async def chain(self, image: str) -> list[str]:
        out = await self._run(qemu_img.backing_chain(self._img, image), timeout=TIMEOUT)
        return qemu_img.parse_chain(out.stdout)

    async def delete(self, record: DiskRecord, block: BlockOps | None, active: bool) -> None:
        if record.method is not Method.INTERNAL or record.tag not in await self.tags(record.image):
            return
        if active and block is not None:
            await block.delete_internal_snapshot(record.vdev, record.tag)
        else:
            await self._run(qemu_img.snapshot_delete(self._img, record.image, record.tag), timeout=TIMEOUT)

    async def check(self, record: DiskRecord, current: DiskSpec) -> None:
        if not Path(record.image).is_file():
            raise NotFound(f"disk {record.vdev}: image {record.image} is missing", vdev=record.vdev, path=record.image)
        if record.method is not Method.INTERNAL:
            return
        if current.target != record.image:
            raise FailedPrecondition(
                f"disk {record.vdev}: tag {record.tag!r} lives in {record.image}, but the domain now runs on "
                f"{current.target}; applying the tag would rewrite an image that snapshots taken since may have "
                "frozen. Revert to one of those instead, or delete them first (snapshot-list --tree shows them)",
                vdev=record.vdev, path=record.image,
            )
        if record.tag not in await self.tags(record.image):
            raise NotFound(f"disk {record.vdev}: {record.image} has no snapshot tagged {record.tag!r}",
                           vdev=record.vdev, path=record.image)
