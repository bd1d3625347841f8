"""Domains as the agent models them, whatever the hypervisor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cached_property

from . import xlcfg
from .errors import InvalidArgument
from .names import check_domain_name
from .xldisk import DEFAULT_XL, DiskSpec, XlVersion, parse_disk

# Settings no caller reads back, not even an admin.
SECRET_KEYS = frozenset({"vncpasswd"})
MASKED = "********"


class RunState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"


@dataclass(frozen=True)
class DomainConfig:
    """A domain's xl.cfg settings, with the ones the agent acts on pulled out."""

    settings: Mapping[str, xlcfg.Value]
    name: str
    memory_mib: int
    vcpus: int
    disks: tuple[DiskSpec, ...]

    @classmethod
    def parse(
        cls, text: str, overrides: Sequence[str] = (), *, source: str = "<config>", xl: XlVersion = DEFAULT_XL
    ) -> DomainConfig:
        """`xl`: the version whose disk-spec grammar applies (the driver's `xl_version`)."""
        return cls.from_settings(xlcfg.parse(text, overrides, source=source), xl)

    @classmethod
    def from_settings(cls, settings: Mapping[str, xlcfg.Value], xl: XlVersion = DEFAULT_XL) -> DomainConfig:
        name = xlcfg.get_str(settings, "name", None)
        if name is None:
            raise InvalidArgument("the domain config has no 'name'")
        memory = xlcfg.get_int(settings, "memory", 128)
        vcpus = xlcfg.get_int(settings, "vcpus", 1)
        if not 16 <= memory <= 1 << 20:
            raise InvalidArgument(f"memory={memory}: expected MiB between 16 and 1048576")
        if not 1 <= vcpus <= 512:
            raise InvalidArgument(f"vcpus={vcpus}: expected 1 to 512")
        disks = tuple(parse_disk(d, xl) for d in xlcfg.get_list(settings, "disk", []))
        vdevs = [d.vdev for d in disks]
        if len(set(vdevs)) != len(vdevs):
            raise InvalidArgument(f"disk: a virtual device is named twice in {vdevs}")
        return cls(dict(settings), check_domain_name(name), memory, vcpus, disks)

    def get_str(self, key: str) -> str | None:
        return xlcfg.get_str(self.settings, key, None)

    def disk(self, vdev: str) -> DiskSpec:
        for d in self.disks:
            if d.vdev == vdev:
                return d
        raise InvalidArgument(f"domain {self.name} has no disk {vdev}")

    def with_disks(self, disks: Sequence[DiskSpec]) -> DomainConfig:
        """The same config with its disk list replaced (external snapshots and reverts move targets)."""
        settings = dict(self.settings)
        settings["disk"] = [d.to_spec() for d in disks]
        return replace(self, settings=settings, disks=tuple(disks))

    def to_text(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:
        # Every ListDomains answer carries each domain's config as text.
        return xlcfg.dump(self.settings)

    def shown(self) -> str:
        """The config as callers see it: secrets (a VNC password) masked; the agent keeps them."""
        return xlcfg.dump({k: MASKED if k in SECRET_KEYS else v for k, v in self.settings.items()})


@dataclass(frozen=True)
class Domain:
    domid: int
    config: DomainConfig
    state: RunState
    cpu_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name
