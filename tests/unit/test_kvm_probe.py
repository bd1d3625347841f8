"""The KVM probe guest: its bytes are its source, assembled; it runs where it must."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from domsnap.agent.drivers import kvm_probe, qemu_argv

SOURCE = Path(kvm_probe.__file__).with_name("kvm_probe.S")


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                    reason="binutils (as, ld) are not installed: the image cannot be rebuilt here")
def test_image_is_the_source_assembled(tmp_path: Path) -> None:
    subprocess.run(["as", "--32", "-o", tmp_path / "p.o", SOURCE], check=True, timeout=30)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat", "binary", "-o", tmp_path / "p.bin",
                    tmp_path / "p.o"], check=True, timeout=30)
    assert (tmp_path / "p.bin").read_bytes() == kvm_probe.IMAGE


def test_probe_guest_runs_to_its_end_under_tcg(tmp_path: Path) -> None:
    # The same argv under TCG: the image really boots, works and exits as
    # the driver expects KVM to make it (a status that no crash gives).
    image = tmp_path / "probe.bin"
    image.write_bytes(kvm_probe.IMAGE)
    argv = qemu_argv.kvm_probe("qemu-system-x86_64", image)
    argv[argv.index("pc,accel=kvm")] = "pc,accel=tcg"
    proc = subprocess.run(argv, capture_output=True, timeout=60)
    assert proc.returncode == kvm_probe.EXIT_STATUS, proc.stderr
