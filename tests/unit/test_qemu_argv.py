"""The exact command lines the qemu driver and the qcow2 backend run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from domsnap.agent.domain import DomainConfig
from domsnap.agent.drivers import qemu_argv, qemu_migration, qemu_spec
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.storage import qemu_img

CFG = '''name = "web1"
memory = 256
vcpus = 2
kernel = "/boot/vmlinuz"
ramdisk = "/boot/initrd.img"
extra = "console=ttyS0 root=/dev/vda"
disk = [ "format=qcow2, vdev=xvda, target=/var/lib/x,y/a.qcow2",
         "format=raw, vdev=xvdb, access=ro, target=/dev/vg/data" ]
'''
PATHS = qemu_argv.LaunchPaths(Path("/s/web1/qmp.sock"), Path("/s/web1/qemu.pid"), Path("/s/console/web1.log"))
DATA = Path(__file__).parent.parent / "data" / "qemu-7.2"


def test_launch_argv_is_exact() -> None:
    argv = qemu_argv.launch(DomainConfig.parse(CFG), binary="qemu-system-x86_64", machine="pc-i440fx-7.2",
                            accel="tcg", paths=PATHS)
    assert argv == [
        "qemu-system-x86_64", "-name", "guest=web1", "-machine", "pc-i440fx-7.2,accel=tcg", "-m", "256",
        "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd.img", "-append", "console=ttyS0 root=/dev/vda",
        "-chardev", "file,id=serial0,path=/s/console/web1.log,append=on", "-serial", "chardev:serial0",
        # A comma in a path is doubled: QEMU's option syntax would split there.
        "-drive", "file=/var/lib/x,,y/a.qcow2,format=qcow2,if=none,id=xvda",
        "-device", "virtio-blk-pci,drive=xvda,id=xvda-dev",
        "-drive", "file=/dev/vg/data,format=raw,if=none,id=xvdb,readonly=on",
        "-device", "virtio-blk-pci,drive=xvdb,id=xvdb-dev",
        "-qmp", "unix:/s/web1/qmp.sock,server=on,wait=off", "-pidfile", "/s/web1/qemu.pid", "-daemonize",
    ]  # fmt: skip


def test_restore_waits_paused_for_the_memory_image() -> None:
    argv = qemu_argv.launch(DomainConfig.parse(CFG), binary="q", machine="m", accel="tcg", paths=PATHS,
                            incoming=True)
    assert argv[-3:] == ["-S", "-incoming", "defer"]


def test_serial_file_from_the_config_and_vhd_as_qemus_vpc() -> None:
    cfg = DomainConfig.parse(CFG, ['serial="file:/var/log/web1.log"', 'disk=["/i/a.vhd,vhd,xvda"]'])
    argv = qemu_argv.launch(cfg, binary="q", machine="m", accel="tcg", paths=PATHS)
    assert "file,id=serial0,path=/var/log/web1.log,append=on" in argv
    assert "file=/i/a.vhd,format=vpc,if=none,id=xvda" in argv


@pytest.mark.parametrize(("text", "message"), [
    (CFG + 'serial="tcp:0.0.0.0:4444"\n', "takes 'pty' or 'file:/absolute/path'"),
    (CFG + 'disk=["/i/cd.iso,raw,hdc:cdrom,r"]\n', "a CD-ROM needs type=\"hvm\""),
    (CFG.replace('kernel = "/boot/vmlinuz"\n', ""), "'kernel' is required"),
])
def test_what_the_driver_cannot_run_is_refused(text: str, message: str) -> None:
    cfg = DomainConfig.parse(text)
    with pytest.raises(InvalidArgument, match=message):
        qemu_argv.launch(cfg, binary="q", machine="m", accel="tcg", paths=PATHS)


# The config, as a Xen user writes it for xl, with user-mode networking.
HVM = """type = "hvm"
name = "web1"
memory = 2048
vcpus = 2
disk = ['/srv/web1.qcow2,qcow2,xvda,w', '/srv/debian.iso,raw,hdc,cdrom']
boot = "dc"
vif = ['mac=00:16:3E:01:02:03']
vnc = 1
"""
UEFI_PATHS = qemu_argv.LaunchPaths(PATHS.qmp_socket, PATHS.pidfile, PATHS.console, Path("/s/nvram/web1.fd"))


def _hvm(*overrides: str, accel: str = "tcg", paths: qemu_argv.LaunchPaths = PATHS) -> list[str]:
    return qemu_argv.launch(DomainConfig.parse(HVM, overrides), binary="qemu-system-x86_64", machine="pc-i440fx-7.2",
                            accel=accel, paths=paths, now=datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC))


def test_hvm_argv_is_exact() -> None:
    assert _hvm() == [
        "qemu-system-x86_64", "-name", "guest=web1", "-machine", "pc-i440fx-7.2,accel=tcg", "-m", "2048",
        "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", "file,id=serial0,path=/s/console/web1.log,append=on", "-serial", "chardev:serial0",
        # boot="dc": the CD-ROM first, then the disk, as bootindex (which OVMF follows too).
        "-drive", "file=/srv/web1.qcow2,format=qcow2,if=none,id=xvda",
        "-device", "virtio-blk-pci,drive=xvda,id=xvda-dev,bootindex=100",
        # hdc: libxl's slot, the secondary IDE master; a CD-ROM is read-only.
        "-drive", "file=/srv/debian.iso,format=raw,if=none,id=hdc,readonly=on",
        "-device", "ide-cd,bus=ide.1,unit=0,drive=hdc,id=hdc-dev,bootindex=0",
        # No bridge named: user-mode networking; libxl's default model.
        "-netdev", "user,id=net0",
        "-device", "rtl8139,netdev=net0,mac=00:16:3e:01:02:03,id=net0-dev",
        # VNC on loopback unless the config says otherwise, the first free display.
        "-vga", "std", "-vnc", "127.0.0.1:0,to=99",
        "-qmp", "unix:/s/web1/qmp.sock,server=on,wait=off", "-pidfile", "/s/web1/qemu.pid", "-daemonize",
    ]  # fmt: skip


def test_uefi_runs_ovmf_on_the_domains_own_nvram() -> None:
    argv = _hvm('bios="ovmf"', paths=UEFI_PATHS)
    i = argv.index("-drive")
    assert argv[i:i + 4] == [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_argv.OVMF_CODE}",
        "-drive", "if=pflash,format=raw,unit=1,file=/s/nvram/web1.fd",
    ]
    with pytest.raises(InvalidArgument, match="needs its NVRAM file"):
        _hvm('bios="ovmf"')
    assert not any("pflash" in a for a in _hvm('bios="seabios"'))


def test_hvm_devices_map_as_libxl_maps_them() -> None:
    argv = _hvm('vif=["bridge=br0,model=e1000,mac=00:16:3e:aa:bb:cc", "model=virtio"]', 'boot="n"',
                'disk=["/d/a.img,raw,hda,w", ",raw,hdb,cdrom"]', 'vnclisten="::1"', "vncdisplay=3",
                'vncpasswd="s3cret"', "usb=1", 'usbdevice="tablet"', 'cpuid="host,sse3=0,aes=1,avx=x"',
                "localtime=1", "rtc_timeoffset=3600", 'serial="pty"')
    joined = " ".join(argv)
    assert "-drive file=/d/a.img,format=raw,if=none,id=hda -device ide-hd,bus=ide.0,unit=0,drive=hda,id=hda-dev" \
        in joined
    # An empty CD-ROM drive: a drive with no medium, at hdb's slot.
    assert "-drive if=none,id=hdb,readonly=on -device ide-cd,bus=ide.0,unit=1,drive=hdb,id=hdb-dev" in joined
    assert "-netdev bridge,id=net0,br=br0 -device e1000,netdev=net0,mac=00:16:3e:aa:bb:cc,id=net0-dev,bootindex=0" \
        in joined
    assert "-netdev user,id=net1 -device virtio-net-pci,netdev=net1,mac=" in joined
    # The password goes through QMP, never argv.
    assert "-vnc [::1]:3,password=on" in joined and "s3cret" not in joined
    assert "-usb -device usb-tablet" in joined
    # libxl's "host" base: everything TCG emulates; sse3 is QEMU's pni; x leaves it.
    assert "-cpu max,-pni,+aes" in joined
    assert "-cpu host,-pni,+aes" in " ".join(_hvm('cpuid="host,sse3=0,aes=1"', accel="kvm"))
    # Local time, an hour ahead.
    assert "-rtc base=" + (datetime(2026, 12, 2, 13, 0, 0, tzinfo=UTC).astimezone().strftime("%Y-%m-%dT%H:%M:%S")) \
        in joined
    assert "-rtc base=localtime" in " ".join(_hvm("localtime=1"))
    assert "-chardev pty,id=serial0,logfile=/s/console/web1.log,logappend=on" in joined


def test_a_nic_without_a_mac_gets_a_stable_one_in_xens_range() -> None:
    first = _hvm('vif=[""]')
    mac = next(a for a in first if a.startswith("rtl8139,")).split("mac=")[1].split(",")[0]
    assert mac.startswith("00:16:3e:") and first == _hvm('vif=[""]')


def test_direct_kernel_boot_stays_under_hvm() -> None:
    argv = _hvm('kernel="/boot/vmlinuz"', 'extra="console=ttyS0"')
    assert argv[argv.index("-kernel"):argv.index("-kernel") + 4] == ["-kernel", "/boot/vmlinuz", "-append",
                                                                     "console=ttyS0"]
    assert not any("bootindex" in a for a in argv)


@pytest.mark.parametrize(("overrides", "message"), [
    # Every refused key is named, with its reason; all of them at once.
    (('maxmem=4096', 'pci=["01:00.0"]', 'on_reboot="destroy"', 'frobnicate=1'),
     "refuses frobnicate \\(not an xl.cfg key the qemu driver knows\\); maxmem \\(memory ballooning is not "
     "supported: a memory image restores into a fixed RAM size\\); on_reboot \\(the qemu driver does not act on "
     "guest power events\\); pci \\(PCI passthrough \\(VFIO\\) is not supported\\)"),
    (('type="pv"', 'kernel="/k"'), "boot \\(an HVM setting: this domain's type is not \"hvm\"\\); vnc \\(an HVM"),
    (('type="pvm"',), "type='pvm': expected"),
    (('bios="coreboot"',), "bios='coreboot': expected one of seabios, ovmf"),
    (('boot="cz"',), "boot='cz': expected devices"),
    (('boot="cc"',), "each once"),
    (('vif=["bridge=br0,ip=10.0.0.2"]',), "not 'ip'"),
    (('vif=["type=vif"]',), "QEMU emulates the NIC"),
    (('vif=["mac=00:16:3e:zz:00:00"]',), "is not a MAC address"),
    (('vif=["model=virtio-gpu"]',), "model='virtio-gpu': expected one of"),
    (('vif=["bridge=br0;rm"]',), "is not an interface name"),
    (('vncdisplay=100',), "vncdisplay=100: expected 0 to 99"),
    (('vncpasswd="012345678"',), "at most 8 characters"),
    (('vnclisten="0.0.0.0,to=9"',), "expected an address"),
    (('usbdevice="disk:/x"',), "usbdevice='disk:/x'"),
    (('cpuid="host,aes=k"',), "no match for k and s"),
    (('cpuid=["0x00000001:ecx=x"]',), "must be a string"),
    (('cpuid="amd"',), "\"host,FEATURE=0\\|1,...\" form only"),
    (('disk=["/d/a.iso,raw,xvde,cdrom"]',), "IDE has 4 slots"),
    (('disk=["/d/a.img,raw,hdc,w", "/d/b.iso,raw,xvdc,cdrom"]',), "take the same IDE slot"),
    (('disk=["/d/a.qcow2,qcow2,hdc,cdrom"]',), "raw CD-ROM images, not qcow2 \\(cdrom\\)"),
])
def test_bad_hvm_settings_are_refused_by_name(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _hvm(*overrides)


def test_every_refused_key_is_named_with_its_reason_all_at_once() -> None:
    with pytest.raises(InvalidArgument) as err:
        _hvm(*(f"{key}=1" for key in qemu_spec.REFUSED))
    for key, reason in qemu_spec.REFUSED.items():
        assert f"{key} ({reason})" in err.value.message, key


def test_kvm_probe_runs_under_kvm_alone() -> None:
    assert qemu_argv.kvm_probe("q", Path("/s/kvm-probe.bin")) == [
        "q", "-machine", "pc,accel=kvm", "-m", "96", "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", "/s/kvm-probe.bin", "-device", "isa-debug-exit", "-serial", "none", "-no-reboot",
    ]  # fmt: skip


def test_machine_alias_and_version_are_read_from_qemus_output() -> None:
    help_text = ("Supported machines are:\n"
                 "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
                 "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n")
    assert qemu_argv.parse_machine_alias(help_text) == "pc-i440fx-7.2"
    assert qemu_argv.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n") == \
        "QEMU 7.2.22"


@pytest.mark.parametrize(("version", "accel", "loses"), [
    ("QEMU 7.2.22", "tcg", True), ("QEMU 8.2.2", "tcg", True), ("QEMU 9.0.0", "tcg", False),
    ("QEMU 10.1.0", "tcg", False), ("QEMU 7.2.22", "kvm", False),
])
def test_which_qemus_precopy_loses_a_tcg_guests_writes(version: str, accel: str, loses: bool) -> None:
    assert qemu_migration.precopy_loses_writes(version, accel) is loses


BACKGROUND, PRECOPY = qemu_migration.LiveMode.BACKGROUND, qemu_migration.LiveMode.PRECOPY


@pytest.mark.parametrize(("configured", "version", "accel", "mode"), [
    # auto: background wherever a pre-copy loses writes (TCG before 9.0) ...
    ("auto", "QEMU 7.2.22", "tcg", BACKGROUND), ("auto", "QEMU 8.2.2", "tcg", BACKGROUND),
    # ... pre-copy where it does not: QEMU 9.0 and later, or KVM's own dirty tracking.
    ("auto", "QEMU 9.0.0", "tcg", PRECOPY), ("auto", "QEMU 10.1.0", "tcg", PRECOPY),
    ("auto", "QEMU 7.2.22", "kvm", PRECOPY), ("auto", "QEMU 9.2.0", "kvm", PRECOPY),
    # An explicit mode is honoured whatever QEMU runs (precopy: with the agent's warning at start).
    ("precopy", "QEMU 7.2.22", "tcg", PRECOPY), ("background", "QEMU 9.0.0", "kvm", BACKGROUND),
])  # fmt: skip
def test_auto_live_mode_writes_in_the_background_where_precopy_loses_writes(
    configured: str, version: str, accel: str, mode: qemu_migration.LiveMode,
) -> None:
    assert qemu_migration.live_mode_for(configured, version, accel) is mode


def test_qemu_img_argv_is_exact() -> None:
    assert qemu_img.info("qemu-img", "/a.qcow2") == ["qemu-img", "info", "-U", "--output=json", "/a.qcow2"]
    assert qemu_img.snapshot_create("qemu-img", "/a.qcow2", "s1") == ["qemu-img", "snapshot", "-c", "s1", "/a.qcow2"]
    assert qemu_img.snapshot_apply("qemu-img", "/a.qcow2", "s1") == ["qemu-img", "snapshot", "-a", "s1", "/a.qcow2"]
    assert qemu_img.snapshot_delete("qemu-img", "/a.qcow2", "s1") == ["qemu-img", "snapshot", "-d", "s1", "/a.qcow2"]
    assert qemu_img.create_overlay("qemu-img", "/o.qcow2", "/a.qcow2", "qcow2") == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "/a.qcow2", "-F", "qcow2", "/o.qcow2"]
    assert qemu_img.backing_chain("qemu-img", "/o.qcow2") == [
        "qemu-img", "info", "-U", "--backing-chain", "--output=json", "/o.qcow2"]


def test_qemu_img_output_is_parsed() -> None:
    # Recorded from qemu-img 7.2.22 (Debian 12).
    info = qemu_img.parse_info('{"snapshots": [{"name": "a", "id": "1"}, {"name": "b c", "id": "2"}],'
                               ' "format": "qcow2", "virtual-size": 10485760}')
    assert qemu_img.snapshot_tags(info) == ["a", "b c"]
    assert qemu_img.parse_chain('[{"filename": "/tmp/c1.qcow2"}, {"filename": "/tmp/c0.qcow2"}]') == [
        "/tmp/c1.qcow2", "/tmp/c0.qcow2"]


def test_machine_types_are_read_from_qemus_recorded_list() -> None:
    # Recorded from this project's QEMU 7.2 (Debian 12): `qemu-system-x86_64 -machine help`.
    machines = qemu_argv.parse_machines((DATA / "machine-help.txt").read_text())
    assert {"pc", "pc-i440fx-7.2", "q35", "microvm", "none"} <= machines
    assert "Supported" not in machines
    assert not any("," in m or " " in m for m in machines)


@pytest.mark.parametrize("machine", ["pc,accel=kvm", "pc,memory-backend=x", "pc -S", ""])
def test_a_machine_type_that_is_not_one_word_never_reaches_the_command_line(machine: str) -> None:
    cfg = DomainConfig.parse(CFG)
    with pytest.raises(InvalidArgument, match="not a machine type name"):
        qemu_argv.launch(cfg, binary="q", machine=machine, accel="tcg", paths=PATHS)
