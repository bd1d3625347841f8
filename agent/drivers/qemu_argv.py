"""Every qemu-system command line the qemu driver runs, built as argv lists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..domain import DomainConfig
from ..errors import InvalidArgument
from ..xldisk import DiskSpec
from . import qemu_spec

# Debian's ovmf package: the firmware (read-only) and the variable store
# every UEFI domain's own NVRAM file starts as.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class LaunchPaths:
    """The per-domain files QEMU is pointed at."""

    qmp_socket: Path
    pidfile: Path
    console: Path
    # The UEFI variable store (a copy of OVMF_VARS), for a UEFI domain.
    nvram: Path | None = None
    # The guest agent channel's socket, for a domain that has one.
    guest_agent: Path | None = None


def _opt(value: str) -> str:
    # QEMU's option parser splits on commas; a literal comma is written twice.
    return value.replace(",", ",,")


# The xl.cfg keys this driver acts on.
KEYS = qemu_spec.KEYS

# xl's disk format names as QEMU's block drivers know them.
FORMATS = {"raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "qed": "qed", "vhd": "vpc"}


def qemu_format(disk: DiskSpec) -> str:
    if disk.format not in FORMATS or (disk.devtype == "cdrom" and disk.format != "raw"):
        raise InvalidArgument(f"disk {disk.vdev}: the qemu driver runs disks of format "
                              f"{', '.join(sorted(FORMATS))} and raw CD-ROM images, not "
                              f"{disk.format}{' (cdrom)' if disk.devtype == 'cdrom' else ''}")
    return FORMATS[disk.format]


def _serial(spec: qemu_spec.GuestSpec, console: Path) -> list[str]:
    # append=on / logappend=on: a restore must not wipe what the guest printed before.
    if spec.serial == "pty":
        chardev = f"pty,id=serial0,logfile={_opt(str(console))},logappend=on"
    else:
        path = console if spec.serial == "default" else Path(spec.serial.removeprefix("file:"))
        chardev = f"file,id=serial0,path={_opt(str(path))},append=on"
    return ["-chardev", chardev, "-serial", "chardev:serial0"]


def _boot_index(spec: qemu_spec.GuestSpec, kind: str, nth: int) -> str:
    # bootindex, not -boot order: OVMF follows only the former.
    if spec.firmware is None or spec.kernel is not None or kind not in spec.boot:
        return ""
    return f",bootindex={spec.boot.index(kind) * 100 + nth}"


def _drives(spec: qemu_spec.GuestSpec) -> list[str]:
    argv: list[str] = []
    seen = {"c": 0, "d": 0}
    for drive in spec.drives:
        disk = drive.disk
        kind = "d" if drive.cdrom else "c"
        boot = _boot_index(spec, kind, seen[kind])
        seen[kind] += 1
        ro = ",readonly=on" if disk.access in ("r", "ro") else ""
        if disk.target:
            argv += ["-drive", f"file={_opt(disk.target)},format={qemu_format(disk)},if=none,id={disk.vdev}{ro}"]
        else:
            argv += ["-drive", f"if=none,id={disk.vdev}{ro}"]
        if drive.ide is None:
            argv += ["-device", f"virtio-blk-pci,drive={disk.vdev},id={disk.vdev}-dev{boot}"]
        else:
            device = "ide-cd" if drive.cdrom else "ide-hd"
            bus, unit = drive.ide
            argv += ["-device", f"{device},bus=ide.{bus},unit={unit},drive={disk.vdev},id={disk.vdev}-dev{boot}"]
    return argv


def _nics(spec: qemu_spec.GuestSpec) -> list[str]:
    argv: list[str] = []
    for i, nic in enumerate(spec.nics):
        # No bridge named: QEMU's user-mode networking (NAT, no host setup).
        netdev = f"user,id=net{i}" if nic.bridge is None else f"bridge,id=net{i},br={nic.bridge}"
        argv += ["-netdev", netdev,
                 "-device", f"{nic.device},netdev=net{i},mac={nic.mac},id=net{i}-dev{_boot_index(spec, 'n', i)}"]
    return argv


def _vnc(vnc: qemu_spec.Vnc) -> list[str]:
    host = f"[{vnc.listen}]" if ":" in vnc.listen else vnc.listen
    # As libxl: with no display fixed, the first free one from :0.
    value = f"{host}:{vnc.display}" if vnc.display is not None else f"{host}:0,to=99"
    # The password itself goes through QMP (change-vnc-password), never argv.
    if vnc.password is not None:
        value += ",password=on"
    return ["-vga", "std", "-vnc", value]


def _guest_agent(name: str, socket: Path | None) -> list[str]:
    if socket is None:
        raise InvalidArgument(f"domain {name}: a guest agent channel needs its socket")
    # wait=off: QEMU starts without a client; the agent connects when it quiesces.
    return ["-chardev", f"socket,id=qga0,path={_opt(str(socket))},server=on,wait=off",
            "-device", "virtio-serial-pci,id=qga0-bus",
            "-device", f"virtserialport,bus=qga0-bus.0,chardev=qga0,name={qemu_spec.GUEST_AGENT_CHANNEL}"]


def _rtc(spec: qemu_spec.GuestSpec, now: datetime | None) -> list[str]:
    if not spec.rtc_offset:
        return ["-rtc", "base=localtime"] if spec.localtime else []
    now = now or datetime.now(UTC)
    if spec.localtime:
        now = now.astimezone()
    base = (now + timedelta(seconds=spec.rtc_offset)).strftime("%Y-%m-%dT%H:%M:%S")
    return ["-rtc", f"base={base}"]


def launch(
    config: DomainConfig,
    *,
    binary: str,
    machine: str,
    accel: str,
    paths: LaunchPaths,
    incoming: bool = False,
    now: datetime | None = None,
) -> list[str]:
    """The command line that starts a domain daemonized, or (incoming) waits for a memory image."""
    if not re.fullmatch(r"[\w.-]+", machine):
        # A machine type is one word; anything else would add -machine options.
        raise InvalidArgument(f"machine type {machine!r}: not a machine type name")
    spec = qemu_spec.guest_spec(config)
    argv = [
        binary,
        "-name", f"guest={_opt(config.name)}",
        "-machine", f"{machine},accel={accel}",
        "-m", str(config.memory_mib),
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
    ]  # fmt: skip
    if spec.cpu_flags is not None:
        # libxl's "host": the host's CPU under KVM; under TCG, everything TCG emulates.
        argv += ["-cpu", ",".join(["host" if accel == "kvm" else "max", *spec.cpu_flags])]
    if spec.uefi:
        if paths.nvram is None:
            raise InvalidArgument(f"domain {config.name}: a UEFI domain needs its NVRAM file")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(str(OVMF_CODE))}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_opt(str(paths.nvram))}"]
    if spec.kernel is not None:
        argv += ["-kernel", spec.kernel]
    if spec.ramdisk is not None:
        argv += ["-initrd", spec.ramdisk]
    if spec.extra is not None:
        argv += ["-append", spec.extra]
    argv += _serial(spec, paths.console)
    argv += _drives(spec)
    argv += _nics(spec)
    if spec.vnc is not None:
        argv += _vnc(spec.vnc)
    if spec.guest_agent:
        argv += _guest_agent(config.name, paths.guest_agent)
    if spec.usb:
        argv += ["-usb"]
        for device in spec.usb_devices:
            argv += ["-device", device]
    argv += _rtc(spec, now)
    argv += ["-qmp", f"unix:{_opt(str(paths.qmp_socket))},server=on,wait=off"]
    argv += ["-pidfile", str(paths.pidfile), "-daemonize"]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def kvm_probe(binary: str, image: Path) -> list[str]:
    """The probe guest (kvm_probe.py) under KVM alone: no fallback to TCG."""
    return [binary, "-machine", "pc,accel=kvm", "-m", "96", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image), "-device", "isa-debug-exit", "-serial", "none", "-no-reboot"]


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
