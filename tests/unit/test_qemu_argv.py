"""The exact command lines the qemu driver and the qcow2 backend run."""

from __future__ import annotations

from pathlib import Path

import pytest

from domsnap.agent.domain import DomainConfig
from domsnap.agent.drivers import qemu_argv
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
    (CFG + 'serial="pty"\n', "only 'file:/absolute/path'"),
    (CFG + 'disk=["/i/cd.iso,raw,hdc:cdrom,r"]\n', "not cdrom"),
    (CFG.replace('kernel = "/boot/vmlinuz"\n', ""), "'kernel' is required"),
])
def test_what_the_driver_cannot_run_is_refused(text: str, message: str) -> None:
    cfg = DomainConfig.parse(text)
    with pytest.raises(InvalidArgument, match=message):
        qemu_argv.launch(cfg, binary="q", machine="m", accel="tcg", paths=PATHS)


def test_machine_alias_and_version_are_read_from_qemus_output() -> None:
    help_text = ("Supported machines are:\n"
                 "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
                 "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n")
    assert qemu_argv.parse_machine_alias(help_text) == "pc-i440fx-7.2"
    assert qemu_argv.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n") == \
        "QEMU 7.2.22"


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
