"""Storage backends: which one owns a disk, and which one made a record."""

from __future__ import annotations

from .. import runner
from ..errors import InvalidArgument
from ..runner import Runner
from ..xldisk import DiskSpec
from .base import DiskBackend, DiskRecord
from .lvm import LvmBackend, is_logical_volume
from .qcow2 import Qcow2Backend
from .raw import RawBackend
from .vhd import VhdBackend


class Backends:
    def __init__(self, *, qemu_img: str = "qemu-img", run: Runner = runner.run, max_chain: int = 32) -> None:
        self._lvm = LvmBackend(run)
        self._by_format: dict[str, DiskBackend] = {}
        self._by_name: dict[str, DiskBackend] = {self._lvm.name: self._lvm}
        backends = (Qcow2Backend(qemu_img, run, max_chain), RawBackend(qemu_img, run),
                    VhdBackend(run=run, max_chain=max_chain))
        for backend in backends:
            self._by_name[backend.name] = backend
            for fmt in backend.formats:
                self._by_format[fmt] = backend

    def for_disk(self, disk: DiskSpec) -> DiskBackend:
        """The backend owning a disk: by its format, and LVM for a raw logical volume."""
        if disk.format == "raw" and is_logical_volume(disk.target):
            return self._lvm
        try:
            return self._by_format[disk.format]
        except KeyError:
            raise InvalidArgument(
                f"disk {disk.vdev}: no storage backend handles {disk.format!r} disks "
                f"(known: {', '.join(sorted(self._by_format))})", reason="FORMAT_UNSUPPORTED", vdev=disk.vdev,
            ) from None

    def for_record(self, record: DiskRecord) -> DiskBackend:
        """The backend that made a snapshot's disk record."""
        try:
            return self._by_name[record.backend]
        except KeyError:
            raise InvalidArgument(f"disk {record.vdev}: unknown storage backend {record.backend!r}") from None
