"""What the rest of the agent asks of a disk, answered by its backend (the
bytes a snapshot copies and where, its copies, its throwaway layers), and
no module outside agent/storage/ deciding by a backend's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from domsnap.agent.storage import Backends
from domsnap.agent.storage.base import DiskRecord, Method, fresh_revert_layer

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def test_a_raw_copy_needs_the_images_allocated_bytes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(b"x" * (3 * MiB))
    rec = DiskRecord("xvdb", "raw", "raw", Method.EXTERNAL, str(image), file=str(tmp_path / "s" / "xvdb.raw"))
    backend = Backends().for_record(rec)
    assert 3 * MiB <= backend.copy_bytes(rec) < 4 * MiB
    assert backend.copies(rec) == [tmp_path / "s" / "xvdb.raw"]
    assert backend.overlays(rec) == []


def test_an_lvm_external_copy_needs_the_volumes_size_and_an_lv_snapshot_nothing(tmp_path: Path) -> None:
    volume = tmp_path / "lv"  # a file stands in for the device: only its size is read
    volume.write_bytes(b"\0" * MiB)
    copy = DiskRecord("xvda", "raw", "lvm", Method.EXTERNAL, str(volume), file=str(tmp_path / "xvda.raw"))
    tag = DiskRecord("xvda", "raw", "lvm", Method.INTERNAL, str(volume), tag="lv.s1")
    backend = Backends().for_record(copy)
    assert backend.copy_bytes(copy) == MiB and backend.copies(copy) == [tmp_path / "xvda.raw"]
    assert backend.copy_bytes(tag) == 0 and backend.copies(tag) == []


@pytest.mark.parametrize(("fmt", "suffix"), [("qcow2", ".qcow2"), ("vhd", ".vhd")])
def test_overlays_and_the_layers_reverts_make_are_throwaway(tmp_path: Path, fmt: str, suffix: str) -> None:
    overlay = tmp_path / f"xvda{suffix}"
    rec = DiskRecord("xvda", fmt, fmt, Method.EXTERNAL, "/img/base", file=str(overlay))
    backend = Backends().for_record(rec)
    assert backend.overlays(rec) == [overlay]
    assert backend.copy_bytes(rec) == 0 and backend.copies(rec) == []
    overlay.touch()
    fresh = fresh_revert_layer(overlay)
    assert fresh.name == f"xvda.r1{suffix}"
    assert backend.is_revert_layer(fresh, "xvda")
    assert not backend.is_revert_layer(fresh, "xvdb")
    assert not backend.is_revert_layer(tmp_path / f"xvda.r1{'.vhd' if fmt == 'qcow2' else '.qcow2'}", "xvda")
    assert not backend.is_revert_layer(overlay, "xvda")


def test_internal_qcow2_snapshots_leave_no_throwaway_layer() -> None:
    rec = DiskRecord("xvda", "qcow2", "qcow2", Method.INTERNAL, "/img/a.qcow2", tag="s1")
    assert Backends().for_record(rec).overlays(rec) == []


def test_no_module_outside_storage_decides_by_a_backends_name() -> None:
    # A record's storage backend; `disk.backend` is Xen's block backend (qdisk, phy), another thing.
    pattern = re.compile(r"""(?<!disk)\.backend\s*(==|!=|in)\s|["'](raw|qcow2|vhd|lvm)["']\s*==\s*\w+\.backend""")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "agent").rglob("*.py")
                 if "storage" not in p.relative_to(ROOT / "agent").parts
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
