"""Storage backends: one per disk format family, one module each."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from ..errors import FailedPrecondition, InvalidArgument
from ..progress import StepProgress
from ..xldisk import DiskSpec


class Method(StrEnum):
    INTERNAL = "internal"
    EXTERNAL = "external"


@dataclass(frozen=True)
class DiskRecord:
    """One disk's part of a snapshot, as the manifest keeps it."""

    vdev: str
    format: str
    backend: str
    method: Method
    # The image the domain used at the snapshot; frozen from then on when
    # the method is external.
    image: str
    # Internal: the tag in `image` (LVM: the snapshot LV). External: "", or
    # LVM's snapshot LV that a copy is read from after the pause (then dropped).
    tag: str = ""
    # External qcow2: the overlay the domain went on with. External raw:
    # the copy that holds the content.
    file: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"vdev": self.vdev, "format": self.format, "backend": self.backend, "method": str(self.method),
                "image": self.image, "tag": self.tag, "file": self.file}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> DiskRecord:
        return cls(data["vdev"], data["format"], data["backend"], Method(data["method"]), data["image"],
                   data.get("tag", ""), data.get("file", ""))


class BlockOps(Protocol):
    """Disk operations on images a running hypervisor holds open.

    The hypervisor owns locks on those images: offline tools would fail or,
    worse (Xen qdisk), succeed unsafely, so they go through the hypervisor.
    """

    async def internal_snapshot(self, vdev: str, tag: str) -> None: ...

    async def delete_internal_snapshot(self, vdev: str, tag: str) -> None: ...

    async def external_snapshot(self, vdev: str, overlay: Path, fmt: str) -> None: ...

    async def drop_overlay(self, vdev: str, backing: Path, fmt: str) -> None:
        """Merge the active overlay of `vdev` back into `backing` and go on
        there; nothing to do when `vdev` already runs on `backing`."""
        ...

    async def commit(self, vdev: str, top: Path, base: Path) -> None:
        """Merge `top`, a layer inside the chain of `vdev` (not its top), into
        `base` below it; the layer above `top` then reads `base`."""
        ...

    def can_overlay(self, vdev: str) -> bool:
        """Whether `vdev` can be moved onto an overlay for a while and back
        (`external_snapshot`, then `drop_overlay`)."""
        ...


class DiskBackend(ABC):
    name: str
    formats: frozenset[str]
    methods: frozenset[Method]
    default_method: Method

    def choose(self, disk: DiskSpec, requested: Method | None) -> Method:
        method = requested or self.default_method
        if method not in self.methods:
            raise InvalidArgument(
                f"disk {disk.vdev} ({disk.format}) cannot take an {method} snapshot; "
                f"it supports: {', '.join(sorted(self.methods))}", reason="METHOD_UNSUPPORTED", vdev=disk.vdev,
            )
        return method

    @abstractmethod
    async def plan(self, disk: DiskSpec, method: Method, snapdir: Path, name: str) -> DiskRecord:
        """Validate and say what `take` will create; touches nothing."""

    @abstractmethod
    async def take(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        """Snapshot the disk; `block` is None when no hypervisor holds the image."""

    async def complete(self, record: DiskRecord, block: BlockOps | None, progress: StepProgress) -> None:
        """After the guest resumed: finish what `take` fixed inside the pause
        (the bulk copy of the instant's data). Nothing by default."""
        return None

    @abstractmethod
    async def undo(self, record: DiskRecord, block: BlockOps | None) -> None:
        """Remove what `take` and `complete` made, leaving the disk as it was
        before them; idempotent."""

    def copy_bytes(self, record: DiskRecord) -> int:
        """Bytes a snapshot of `record` copies into `record.file`, whose
        filesystem must have room for them; 0 when it copies nothing (a tag,
        an overlay)."""
        return 0

    def copies(self, record: DiskRecord) -> list[Path]:
        """The files of a taken snapshot that hold a copy of the disk's data."""
        return []

    def overlays(self, record: DiskRecord) -> list[Path]:
        """The files a snapshot of `record` made for the domain to run on
        (external overlays and children): throwaway once a revert leaves them."""
        return []

    def is_revert_layer(self, path: Path, vdev: str) -> bool:
        """Whether `path` is a layer a revert of `vdev` made (throwaway in turn)."""
        return False

    def mergeable(self, record: DiskRecord) -> bool:
        """Whether `merge` can fold this record's layer into the image below it."""
        return False

    async def merge(self, record: DiskRecord, block: BlockOps | None, top: str | None, children: list[str]) -> None:
        """Fold `record.file`, a layer over `record.image`, into that image once
        no snapshot needs the instant between them; idempotent.

        `top`: the domain's disk when the layer is in its running chain (the
        hypervisor merges it, live); None when no hypervisor reads the chain,
        and then `children` are the files right above the layer, pointed at
        the image afterwards."""
        raise FailedPrecondition(f"disk {record.vdev}: {self.name} layers cannot be merged", vdev=record.vdev)

    async def chain(self, image: str) -> list[str]:
        """The files `image` reads through (itself first); formats without
        backing files have only themselves."""
        return [image]

    def frozen_layers(self, record: DiskRecord) -> tuple[str, ...]:
        """The files this snapshot needs unchanged for ever: by default, the
        image an external snapshot froze below its overlay. Writing one (a
        domain started on it again) silently corrupts the snapshot."""
        return (record.image,) if record.method is Method.EXTERNAL else ()

    @abstractmethod
    async def delete(self, record: DiskRecord, block: BlockOps | None, active: bool) -> None:
        """Remove what lives inside an image for this record (a tag); files are
        the caller's. `active`: the image is the running domain's top layer."""

    @abstractmethod
    async def check(self, record: DiskRecord, current: DiskSpec) -> None:
        """A revert of `current` to `record` can be done: what it needs is
        present (NotFound otherwise) and it would harm no other snapshot."""

    @abstractmethod
    async def revert(self, record: DiskRecord, current: DiskSpec, progress: StepProgress) -> DiskSpec:
        """Bring the (offline) disk back to the record's content; returns the disk to use now."""


def fresh_revert_layer(first: Path) -> Path:
    """The layer a revert puts under a domain, beside the snapshot's own
    (xvda.qcow2 -> xvda.r1.qcow2, xvda.r2.qcow2, ...): the first name not taken."""
    n = 1
    while (candidate := first.with_name(f"{first.stem}.r{n}{first.suffix}")).exists():
        n += 1
    return candidate


def named_as_revert_layer(path: Path, vdev: str, suffix: str) -> bool:
    """Whether `path` is named as `fresh_revert_layer` names the layers of `vdev`."""
    return re.fullmatch(rf"{re.escape(vdev)}\.r\d+{re.escape(suffix)}", path.name) is not None
