"""What a domain's xl.cfg asks of QEMU, checked and pulled out, before any
argv is built: the xl.cfg subset the qemu driver runs, mapped the way libxl
maps an HVM guest for qemu-xen (boot order, firmware, emulated CD-ROMs,
NICs, VNC, serial, CPUID, USB, RTC). Every other key is refused by name,
with the reason; nothing here touches the host.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .. import xlcfg
from ..domain import DomainConfig
from ..errors import InvalidArgument
from ..xldisk import DiskSpec

# Keys every domain may have; `kernel`, `ramdisk` and `extra` boot a kernel
# directly (the only way for type "pv"/"pvh", which QEMU runs as a PC).
COMMON_KEYS = frozenset({"name", "memory", "vcpus", "disk", "serial", "type", "builder", "kernel", "ramdisk",
                         "extra", "vif", "channel"})
# Keys only an HVM guest has in xl.cfg(5).
HVM_KEYS = frozenset({"boot", "bios", "vnc", "vnclisten", "vncdisplay", "vncunused", "vncpasswd", "nographic",
                      "usb", "usbdevice", "localtime", "rtc_timeoffset", "cpuid"})
KEYS = COMMON_KEYS | HVM_KEYS

# Why a key a Xen user may well write has no meaning under the qemu driver.
REFUSED = {
    "maxmem": "memory ballooning is not supported: a memory image restores into a fixed RAM size",
    "maxvcpus": "vCPU hotplug is not supported",
    "pci": "PCI passthrough (VFIO) is not supported",
    "bootloader": "pygrub runs under Xen only: use type=\"hvm\" with firmware, or kernel=",
    "sdl": "no local display: use vnc",
    "vga": "the display is QEMU's standard VGA, there when vnc is on",
    "stdvga": "the display is QEMU's standard VGA, there when vnc is on",
    "videoram": "the display is QEMU's standard VGA, there when vnc is on",
    "on_poweroff": "the qemu driver does not act on guest power events",
    "on_reboot": "the qemu driver does not act on guest power events",
    "on_crash": "the qemu driver does not act on guest power events",
    "device_model_args": "QEMU's command line is built by the driver alone",
    "device_model_args_hvm": "QEMU's command line is built by the driver alone",
    "device_model_override": "the agent's [qemu] binary runs every domain",
    "cpus": "vCPU pinning is not supported",
    "cpu_weight": "scheduler parameters are Xen's",
    "cpu_cap": "scheduler parameters are Xen's",
    "vfb": "PV framebuffers are Xen's: use vnc on an HVM guest",
    "vtpm": "no TPM emulation",
    "soundhw": "no sound device",
    "viridian": "no Hyper-V enlightenments",
    "shadow_memory": "Xen's shadow paging has no QEMU equivalent",
    "acpi_s3": "ACPI sleep states are QEMU's defaults",
    "acpi_s4": "ACPI sleep states are QEMU's defaults",
    "ms_vm_genid": "no VM generation ID device",
    "nestedhvm": "nested virtualization is not configured by the driver",
    "hap": "hardware-assisted paging is the accelerator's",
    "pae": "PAE is always on",
    "acpi": "ACPI is always on",
    "apic": "the APIC is always on",
}

FIRMWARES = ("seabios", "ovmf")
# xl's `model=` names as QEMU's NIC devices; libxl's default is rtl8139.
NIC_MODELS = {"rtl8139": "rtl8139", "e1000": "e1000", "virtio": "virtio-net-pci", "virtio-net": "virtio-net-pci",
              "ne2k_pci": "ne2k_pci", "i82551": "i82551", "pcnet": "pcnet"}
USB_DEVICES = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
# libxl's CPUID feature names that QEMU spells otherwise.
CPUID_NAMES = {"sse3": "pni", "cmpxchg16": "cx16", "cmpxchg8": "cx8", "sse4_1": "sse4.1", "sse4_2": "sse4.2",
               "lahfsahf": "lahf-lm", "svm_npt": "npt", "svm_lbrv": "lbrv", "htt": "ht", "clfsh": "clflush",
               "ds_cpl": "ds-cpl", "pclmulqdq": "pclmulqdq"}
IDE_SLOTS = 4
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_BRIDGE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_HOST = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
_FLAG = re.compile(r"[a-z0-9_.-]{1,32}")
_VIF_KEYS = frozenset({"bridge", "mac", "model", "type"})
# xl.cfg(5)'s channel=[...]: the one channel the driver makes is the QEMU
# guest agent's virtio-serial port; its socket is the agent's to place.
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class Nic:
    mac: str
    device: str
    # None: user-mode networking (no bridge named).
    bridge: str | None


@dataclass(frozen=True)
class Vnc:
    listen: str
    # None: the first free display from 0 (xl's vncunused=1).
    display: int | None
    password: str | None


@dataclass(frozen=True)
class Drive:
    disk: DiskSpec
    # (bus, unit) on the IDE controller, or None for virtio-blk.
    ide: tuple[int, int] | None
    cdrom: bool


@dataclass(frozen=True)
class GuestSpec:
    """Everything about a domain's QEMU that its config decides."""

    hvm: bool
    kernel: str | None
    ramdisk: str | None
    extra: str | None
    firmware: str | None  # "seabios" | "ovmf" for an HVM guest booting from a device
    boot: str
    drives: tuple[Drive, ...]
    nics: tuple[Nic, ...]
    vnc: Vnc | None
    serial: str  # "default" | "pty" | "file:/PATH"
    usb_devices: tuple[str, ...]
    usb: bool
    localtime: bool
    rtc_offset: int
    cpu_flags: tuple[str, ...] | None
    # channel=["name=org.qemu.guest_agent.0"]: a virtio-serial port for the guest agent.
    guest_agent: bool = False

    @property
    def uefi(self) -> bool:
        return self.firmware == "ovmf"


def check_keys(config: DomainConfig) -> None:
    """Refuse every key the driver would not honour, each with its reason."""
    hvm = _is_hvm(config.settings)
    problems = []
    for key in sorted(config.settings):
        if key in COMMON_KEYS or (hvm and key in HVM_KEYS):
            continue
        if key in HVM_KEYS:
            problems.append(f"{key} (an HVM setting: this domain's type is not \"hvm\")")
        else:
            problems.append(f"{key} ({REFUSED.get(key, 'not an xl.cfg key the qemu driver knows')})")
    if problems:
        raise InvalidArgument(f"domain {config.name}: the qemu driver refuses " + "; ".join(problems))


def _is_hvm(settings: Mapping[str, xlcfg.Value]) -> bool:
    kind = xlcfg.get_str(settings, "type", None) or xlcfg.get_str(settings, "builder", None) or "pv"
    if kind not in ("pv", "pvh", "hvm", "generic"):
        raise InvalidArgument(f"type={kind!r}: expected \"hvm\", \"pvh\" or \"pv\"")
    return kind == "hvm"


def guest_spec(config: DomainConfig) -> GuestSpec:
    check_keys(config)
    s = config.settings
    hvm = _is_hvm(s)
    kernel = config.get_str("kernel")
    if kernel is None and not hvm:
        raise InvalidArgument(f"domain {config.name}: 'kernel' is required (direct kernel boot), or type=\"hvm\" "
                              "to boot from a disk or CD-ROM")
    firmware = xlcfg.get_str(s, "bios", "seabios") if hvm else None
    if firmware is not None and firmware not in FIRMWARES:
        raise InvalidArgument(f"bios={firmware!r}: expected one of {', '.join(FIRMWARES)}")
    boot = xlcfg.get_str(s, "boot", "cd")
    if not boot or any(c not in "acdn" for c in boot) or len(set(boot)) != len(boot):
        raise InvalidArgument(f"boot={boot!r}: expected devices from 'c' (disk), 'd' (CD-ROM), 'n' (network), "
                              "each once")
    vnc = _vnc(s) if hvm and xlcfg.get_int(s, "vnc", 0) != 0 else None
    usb_devices = _usb_devices(s)
    return GuestSpec(
        hvm=hvm, kernel=kernel, ramdisk=config.get_str("ramdisk"), extra=config.get_str("extra"),
        firmware=firmware, boot=boot, drives=_drives(config.disks, hvm), nics=_nics(config), vnc=vnc,
        serial=_serial(config.get_str("serial")), usb=bool(xlcfg.get_int(s, "usb", 0)) or bool(usb_devices),
        usb_devices=usb_devices, localtime=bool(xlcfg.get_int(s, "localtime", 0)),
        rtc_offset=xlcfg.get_int(s, "rtc_timeoffset", 0), cpu_flags=_cpuid(xlcfg.get_str(s, "cpuid", None)),
        guest_agent=_guest_agent(xlcfg.get_list(s, "channel", [])),
    )


def _drives(disks: tuple[DiskSpec, ...], hvm: bool) -> tuple[Drive, ...]:
    drives = []
    taken: dict[int, str] = {}
    for disk in disks:
        cdrom = disk.devtype == "cdrom"
        # As libxl: hdX disks and every CD-ROM are emulated IDE devices,
        # at the IDE slot of the device's index (hdc: secondary master).
        if cdrom or (hvm and disk.vdev.startswith("hd")):
            if not hvm:
                raise InvalidArgument(f"disk {disk.vdev}: a CD-ROM needs type=\"hvm\"")
            index = _index(disk.vdev)
            if index >= IDE_SLOTS:
                raise InvalidArgument(f"disk {disk.vdev}: IDE has {IDE_SLOTS} slots (hda-hdd, xvda-xvdd); "
                                      f"{disk.vdev} is beyond them")
            if index in taken:
                raise InvalidArgument(f"disks {taken[index]} and {disk.vdev} take the same IDE slot")
            taken[index] = disk.vdev
            drives.append(Drive(disk, divmod(index, 2), cdrom))
        else:
            drives.append(Drive(disk, None, False))
    return tuple(drives)


def _index(vdev: str) -> int:
    letters = re.sub(r"^(xvd|hd|sd|vd)", "", vdev)
    letters = re.sub(r"[0-9]+$", "", letters)
    n = 0
    for c in letters:
        n = n * 26 + ord(c) - ord("a") + 1
    return n - 1


def _nics(config: DomainConfig) -> tuple[Nic, ...]:
    nics = []
    for i, spec in enumerate(xlcfg.get_list(config.settings, "vif", [])):
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in _VIF_KEYS:
                raise InvalidArgument(f"vif {i} ({spec!r}): the qemu driver takes {', '.join(sorted(_VIF_KEYS))}; "
                                      f"not {key!r}")
            fields[key] = value
        if fields.get("type", "ioemu") != "ioemu":
            raise InvalidArgument(f"vif {i}: type={fields['type']!r}: QEMU emulates the NIC (type=ioemu)")
        mac = fields.get("mac", "").lower() or _stable_mac(config.name, i)
        if not _MAC.fullmatch(mac):
            raise InvalidArgument(f"vif {i}: mac={fields['mac']!r} is not a MAC address like 00:16:3e:01:02:03")
        model = fields.get("model", "rtl8139")
        if model not in NIC_MODELS:
            raise InvalidArgument(f"vif {i}: model={model!r}: expected one of {', '.join(sorted(NIC_MODELS))}")
        bridge = fields.get("bridge") or None
        if bridge is not None and not _BRIDGE.fullmatch(bridge):
            raise InvalidArgument(f"vif {i}: bridge={bridge!r} is not an interface name")
        nics.append(Nic(mac, NIC_MODELS[model], bridge))
    return tuple(nics)


def _guest_agent(channels: list[str]) -> bool:
    """xl.cfg's channel=[...], of which the driver makes the guest agent's alone."""
    for i, spec in enumerate(channels):
        fields = dict(part.strip().partition("=")[::2] for part in spec.split(",") if part.strip())
        if fields.get("name") != GUEST_AGENT_CHANNEL:
            raise InvalidArgument(f"channel {i} ({spec!r}): the qemu driver makes one channel, "
                                  f"name={GUEST_AGENT_CHANNEL} (the QEMU guest agent's)")
        if fields.get("connection", "socket") != "socket" or set(fields) - {"name", "connection"}:
            raise InvalidArgument(f"channel {i} ({spec!r}): the guest agent's channel takes name= and "
                                  "connection=socket only (its socket is in the domain's folder)")
    if len(channels) > 1:
        raise InvalidArgument(f"channel: {GUEST_AGENT_CHANNEL} given {len(channels)} times")
    return bool(channels)


def _stable_mac(name: str, index: int) -> str:
    # Xen's OUI, as xl uses; derived from the name so a relaunch (a restore)
    # shows the guest the same address.
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in (digest[0] & 0x7F, digest[1], digest[2]))


def _vnc(s: Mapping[str, xlcfg.Value]) -> Vnc:
    listen = xlcfg.get_str(s, "vnclisten", "127.0.0.1")
    if not _HOST.fullmatch(listen):
        raise InvalidArgument(f"vnclisten={listen!r}: expected an address")
    display = xlcfg.get_int(s, "vncdisplay", None)
    if display is None and xlcfg.get_int(s, "vncunused", 1) == 0:
        display = 0
    if display is not None and not 0 <= display <= 99:
        raise InvalidArgument(f"vncdisplay={display}: expected 0 to 99")
    password = xlcfg.get_str(s, "vncpasswd", None) or None
    if password is not None and len(password) > 8:
        # VNC's authentication uses the first 8 characters only.
        raise InvalidArgument("vncpasswd: VNC passwords have at most 8 characters")
    return Vnc(listen, display, password)


def _serial(value: str | None) -> str:
    if value is None:
        return "default"
    if value == "pty" or (value.startswith("file:/") and "\n" not in value):
        return value
    raise InvalidArgument(f"serial={value!r}: the qemu driver takes 'pty' or 'file:/absolute/path'")


def _usb_devices(s: Mapping[str, xlcfg.Value]) -> tuple[str, ...]:
    value = s.get("usbdevice")
    names = [] if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]
    for name in names:
        if name not in USB_DEVICES:
            raise InvalidArgument(f"usbdevice={name!r}: expected one of {', '.join(sorted(USB_DEVICES))}")
    return tuple(USB_DEVICES[n] for n in names)


def _cpuid(value: str | None) -> tuple[str, ...] | None:
    """libxl's "host,FEATURE=0|1,..." as QEMU's -FEATURE / +FEATURE."""
    if value is None:
        return None
    base, *features = value.split(",")
    if base != "host":
        raise InvalidArgument(f"cpuid={value!r}: the qemu driver takes libxl's \"host,FEATURE=0|1,...\" form only")
    flags = []
    for feature in features:
        name, sep, setting = feature.partition("=")
        if not sep or not _FLAG.fullmatch(name) or setting not in ("0", "1", "x"):
            raise InvalidArgument(f"cpuid: {feature!r}: expected FEATURE=0, FEATURE=1 or FEATURE=x "
                                  "(QEMU has no match for k and s)")
        if setting != "x":
            flags.append(("+" if setting == "1" else "-") + CPUID_NAMES.get(name, name))
    return tuple(flags)
