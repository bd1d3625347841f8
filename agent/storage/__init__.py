"""Storage backends by disk format."""

from __future__ import annotations

from domsnap.agent import runner
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.runner import Runner
from domsnap.agent.storage.base import DiskBackend
from domsnap.agent.storage.qcow2 import Qcow2Backend
from domsnap.agent.storage.raw import RawBackend


class Backends:
    """The backend owning each disk format."""

    def __init__(self, *, qemu_img: str = "qemu-img", run: Runner = runner.run, max_chain: int = 32) -> None:
        self._by_format: dict[str, DiskBackend] = {}
        for backend in (Qcow2Backend(qemu_img, run, max_chain), RawBackend()):
            for fmt in backend.formats:
                self._by_format[fmt] = backend

    def for_format(self, fmt: str) -> DiskBackend:
        try:
            return self._by_format[fmt]
        except KeyError:
            raise InvalidArgument(
                f"no storage backend handles {fmt!r} disks here (known: {', '.join(sorted(self._by_format))})"
            ) from None

    def by_name(self, name: str) -> DiskBackend:
        for backend in self._by_format.values():
            if backend.name == name:
                return backend
        raise InvalidArgument(f"unknown storage backend {name!r}")
