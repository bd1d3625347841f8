"""Storage backends: which one owns a disk, and which one made a record."""

from __future__ import annotations

from domsnap.agent import runner
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.runner import Runner
from domsnap.agent.storage.base import DiskBackend, DiskRecord
from domsnap.agent.storage.lvm import LvmBackend, is_logical_volume
from domsnap.agent.storage.qcow2 import Qcow2Backend
from domsnap.agent.storage.raw import RawBackend
from domsnap.agent.storage.vhd import VhdBackend
from domsnap.agent.xldisk import DiskSpec


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
                f"(known: {', '.join(sorted(self._by_format))})"
            ) from None

    def for_record(self, record: DiskRecord) -> DiskBackend:
        """The backend that made a snapshot's disk record."""
        try:
            return self._by_name[record.backend]
        except KeyError:
            raise InvalidArgument(f"disk {record.vdev}: unknown storage backend {record.backend!r}") from None
