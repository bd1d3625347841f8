"""The qcow2 snapshot table read in Python (a create's check that its tag is
free) gives what the real `qemu-img info` gives, on real images made by the
real qemu-img, and hands what it does not expect back to qemu-img."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from domsnap.agent.storage import qcow2_tags
from domsnap.agent.storage.qcow2 import Qcow2Backend


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def qemu_img_tags(image: Path) -> list[str]:
    return [s["name"] for s in json.loads(qemu_img("info", "-U", "--output=json", str(image))).get("snapshots", [])]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])  # qcow2 versions 2 and 3
def test_tags_are_qemu_imgs_in_its_order(tmp_path: Path, compat: str) -> None:
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(image), "8M")
    assert qcow2_tags.read_tags(image) == [] == qemu_img_tags(image)
    # Names of odd lengths (the entries' 8-byte padding), one deleted in the middle.
    for tag in ("a", "snap-2", "20261202T181500Z", "x" * 64, "gone", "é.b_c"):
        qemu_img("snapshot", "-c", tag, str(image))
    qemu_img("snapshot", "-d", "gone", str(image))
    assert qcow2_tags.read_tags(image) == qemu_img_tags(image) == ["a", "snap-2", "20261202T181500Z", "x" * 64,
                                                                   "é.b_c"]


def test_what_the_reader_does_not_follow_is_left_to_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 4096)
    assert qcow2_tags.read_tags(raw) is None
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "8M")
    qemu_img("snapshot", "-c", "t", str(image))
    table = int.from_bytes(image.read_bytes()[64:72], "big")
    with open(image, "r+b") as f:
        f.truncate(table + 20)  # the table cut short
    assert qcow2_tags.read_tags(image) is None
    # qemu-img reads the missing bytes as zeros: one snapshot with no name, an answer only it gives.
    assert asyncio.run(Qcow2Backend().tags(str(image))) == qemu_img_tags(image) == [""]
