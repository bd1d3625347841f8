"""Every qemu-system command line the qemu driver runs, built as argv lists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from domsnap.agent.domain import DomainConfig
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.xldisk import DiskSpec


@dataclass(frozen=True)
class LaunchPaths:
    """The per-domain files QEMU is pointed at."""

    qmp_socket: Path
    pidfile: Path
    console: Path


def _opt(value: str) -> str:
    # QEMU's option parser splits on commas; a literal comma is written twice.
    return value.replace(",", ",,")


# The xl.cfg keys this driver acts on.
KEYS = frozenset({"name", "memory", "vcpus", "kernel", "ramdisk", "extra", "disk", "serial"})

# xl's disk format names as QEMU's block drivers know them.
FORMATS = {"raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "qed": "qed", "vhd": "vpc"}


def qemu_format(disk: DiskSpec) -> str:
    if disk.devtype == "cdrom" or disk.format not in FORMATS:
        raise InvalidArgument(f"disk {disk.vdev}: the qemu driver runs disks of format "
                              f"{', '.join(sorted(FORMATS))}, not {disk.devtype or disk.format}")
    return FORMATS[disk.format]


def _serial(config: DomainConfig, default: Path) -> Path:
    serial = config.get_str("serial")
    if serial is None:
        return default
    if not serial.startswith("file:") or not serial.removeprefix("file:").startswith("/"):
        raise InvalidArgument(f"serial={serial!r}: only 'file:/absolute/path' is supported")
    return Path(serial.removeprefix("file:"))


def launch(
    config: DomainConfig,
    *,
    binary: str,
    machine: str,
    accel: str,
    paths: LaunchPaths,
    incoming: bool = False,
) -> list[str]:
    """The command line that starts a domain daemonized, or (incoming) waits for a memory image."""
    if not re.fullmatch(r"[\w.-]+", machine):
        # A machine type is one word; anything else would add -machine options.
        raise InvalidArgument(f"machine type {machine!r}: not a machine type name")
    kernel = config.get_str("kernel")
    if kernel is None:
        raise InvalidArgument(f"domain {config.name}: 'kernel' is required (direct kernel boot)")
    argv = [
        binary,
        "-name", f"guest={_opt(config.name)}",
        "-machine", f"{machine},accel={accel}",
        "-m", str(config.memory_mib),
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", kernel,
    ]  # fmt: skip
    if (ramdisk := config.get_str("ramdisk")) is not None:
        argv += ["-initrd", ramdisk]
    if (extra := config.get_str("extra")) is not None:
        argv += ["-append", extra]
    # append=on: a restore must not wipe what the guest printed before.
    argv += ["-chardev", f"file,id=serial0,path={_opt(str(_serial(config, paths.console)))},append=on"]
    argv += ["-serial", "chardev:serial0"]
    for disk in config.disks:
        ro = ",readonly=on" if disk.access in ("r", "ro") else ""
        argv += ["-drive", f"file={_opt(disk.target)},format={qemu_format(disk)},if=none,id={disk.vdev}{ro}"]
        argv += ["-device", f"virtio-blk-pci,drive={disk.vdev},id={disk.vdev}-dev"]
    argv += ["-qmp", f"unix:{_opt(str(paths.qmp_socket))},server=on,wait=off"]
    argv += ["-pidfile", str(paths.pidfile), "-daemonize"]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def machine_help(binary: str) -> list[str]:
    return [binary, "-machine", "help"]


def version(binary: str) -> list[str]:
    return [binary, "--version"]


def parse_machine_alias(help_text: str, alias: str = "pc") -> str:
    """The versioned machine type behind an alias (`pc` -> `pc-i440fx-7.2`)."""
    m = re.search(rf"^{re.escape(alias)}\s+.*\(alias of ([\w.-]+)\)", help_text, re.MULTILINE)
    if m is None:
        raise InvalidArgument(f"QEMU lists no machine alias {alias!r}")
    return m.group(1)


def parse_machines(help_text: str) -> frozenset[str]:
    """Every machine type `-machine help` lists (the first word of each line after the title)."""
    return frozenset(m.group(1) for m in re.finditer(r"^([\w.-]+)\s", help_text, re.MULTILINE)
                     if m.group(1) != "Supported")


def parse_version(text: str) -> str:
    m = re.search(r"QEMU emulator version (\S+)", text)
    if m is None:
        raise InvalidArgument(f"cannot read QEMU's version from {text[:80]!r}")
    return f"QEMU {m.group(1)}"
