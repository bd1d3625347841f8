"""Offline merge of an external snapshot's layer, on real qcow2 files made and
read by the real qemu-img and qemu-io: the data of every layer above stays
byte for byte, and the chain is one image shorter."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.agent.storage.qcow2 import Qcow2Backend

MiB = 1 << 20


def qemu_io(image: Path, command: str) -> str:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], capture_output=True, text=True,
                          check=True).stdout


def overlay(path: Path, backing: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path)],
                   check=True)
    return path


def test_offline_merge_folds_the_layer_and_repoints_the_one_above(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    qemu_io(base, "write -P 0x11 0 2M")
    layer = overlay(tmp_path / "layer.qcow2", base)  # the deleted snapshot's overlay
    qemu_io(layer, "write -P 0x22 1M 2M")
    above = overlay(tmp_path / "above.qcow2", layer)  # the next snapshot's overlay
    qemu_io(above, "write -P 0x33 2M 1M")
    rec = DiskRecord("xvda", "qcow2", "qcow2", Method.EXTERNAL, str(base), file=str(layer))
    backend = Qcow2Backend()

    async def main() -> list[str]:
        await backend.merge(rec, None, None, [str(above)])
        await backend.merge(rec, None, None, [str(above)])  # again, as after a crash: nothing left to do
        return await backend.chain(str(above))

    assert asyncio.run(main()) == [str(above), str(base)]
    for offset, pattern in ((0, 0x11), (1 * MiB, 0x22), (2 * MiB, 0x33), (3 * MiB, 0)):
        assert "Pattern verification failed" not in qemu_io(above, f"read -P {pattern} {offset} 1M"), offset
