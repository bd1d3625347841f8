"""A Xen domain's libxl config (the JSON of `xl list -l`) as the xl.cfg settings
the agent models domains with.

The conversion carries what the agent compares and what a restore with a
written config file needs (type, memory, vcpus, kernel and command line,
lifecycle actions, disks, network interfaces). It is not complete: libxl
knows far more (HVM devices, PCI, frame buffers...). So the driver restores
from the config saved inside the image whenever the disks did not move, and
only falls back to this one when they did (see XenDriver.restore).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Final

from .. import xlcfg
from ..domain import DomainConfig
from ..xldisk import BACKEND_TYPES, DiskSpec
from .xl_argv import XlDisk, XlDomain, XlNic

_ACTIONS: Final = ("on_poweroff", "on_reboot", "on_watchdog", "on_crash", "on_soft_reset")
# libxl_action_on_shutdown names as JSON has them -> xl.cfg's (xl_parse.c);
# JSON omits the default, destroy.
_ACTION_NAMES: Final = {
    "destroy": "destroy", "restart": "restart", "restart_rename": "rename-restart", "preserve": "preserve",
    "coredump_destroy": "coredump-destroy", "coredump_restart": "coredump-restart", "soft_reset": "soft-reset",
}  # fmt: skip
_NIC_TYPES: Final = {"vif": "vif", "vif_ioemu": "ioemu"}


def disk_spec(disk: XlDisk) -> DiskSpec:
    cdrom = disk.cdrom
    return DiskSpec(
        target=disk.target,
        vdev=disk.vdev,
        format="empty" if cdrom and not disk.target else disk.format,
        access="rw" if disk.readwrite and not cdrom else "ro",
        devtype="cdrom" if cdrom else None,
        backendtype=disk.backend if disk.backend in BACKEND_TYPES else None,
    )


def vif_spec(nic: XlNic) -> str:
    fields = {
        "mac": nic.mac, "bridge": nic.bridge, "ip": nic.ip, "script": nic.script, "model": nic.model,
        "vifname": nic.vifname, "type": _NIC_TYPES.get(nic.nictype, ""),
    }  # fmt: skip
    return ",".join(f"{key}={value}" for key, value in fields.items() if value)


def _build_value(b_info: Mapping[str, Any], domain_type: str, key: str) -> str:
    # Xen 4.17 keeps kernel, cmdline, ramdisk and bootloader at the top of
    # b_info; older libxl kept them under "type.pv".
    value = b_info.get(key) or b_info.get(f"type.{domain_type}", {}).get(key)
    return str(value) if value else ""


GENID_LEN: Final = 16


def vm_genid(config: Mapping[str, Any]) -> bytes | None:
    """The VM generation ID of an HVM domain's libxl config (JSON: 16 byte
    values under b_info's `type.hvm`), None when the domain has none."""
    value = config.get("b_info", {}).get("type.hvm", {}).get("ms_vm_genid")
    if isinstance(value, list) and len(value) == GENID_LEN and all(isinstance(b, int) for b in value) and any(value):
        return bytes(value)
    return None


def with_fresh_genid(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """A copy of the config with a new random VM generation ID, or None when
    the domain has none. A reverted guest that uses one must see it change
    (the point of the ID); libxl writes the config's value into the guest on
    every restore, and `xl restore` of an image takes the config the image
    carries, with the old value, so the agent must give it a new one."""
    if vm_genid(config) is None:
        return None
    fresh = copy.deepcopy(dict(config))
    new = os.urandom(GENID_LEN)
    while not any(new):
        new = os.urandom(GENID_LEN)
    fresh["b_info"]["type.hvm"]["ms_vm_genid"] = list(new)
    return fresh


def domain_config(dom: XlDomain) -> DomainConfig:
    b_info: Mapping[str, Any] = dom.config.get("b_info", {})
    settings: dict[str, xlcfg.Value] = {"name": dom.name, "type": dom.type}
    if dom.uuid:
        settings["uuid"] = dom.uuid
    # Numbers as xl.cfg text, which is how xl (and xlcfg.parse) reads them back.
    settings["memory"] = xlcfg.Number(dom.memory_mib)
    if dom.max_memory_mib > dom.memory_mib:
        settings["maxmem"] = xlcfg.Number(dom.max_memory_mib)
    settings["vcpus"] = xlcfg.Number(dom.vcpus)
    if dom.max_vcpus > dom.vcpus:
        settings["maxvcpus"] = xlcfg.Number(dom.max_vcpus)
    for key, setting in (("kernel", "kernel"), ("ramdisk", "ramdisk"), ("cmdline", "extra"),
                         ("bootloader", "bootloader")):
        if value := _build_value(b_info, dom.type, key):
            settings[setting] = value
    if tsc_mode := b_info.get("tsc_mode"):
        # A PVH guest saved with tsc_mode="native" must come back with it.
        settings["tsc_mode"] = str(tsc_mode)
    for action in _ACTIONS:
        if what := dom.config.get(action):
            settings[action] = _ACTION_NAMES.get(str(what), str(what))
    if vm_genid(dom.config) is not None:
        # xl_parse.c draws a new ID for "generate" on every create or restore.
        settings["ms_vm_genid"] = "generate"
    settings["disk"] = [disk_spec(d).to_spec() for d in dom.disks]
    if dom.nics:
        settings["vif"] = [vif_spec(n) for n in dom.nics]
    return DomainConfig.from_settings(settings)
