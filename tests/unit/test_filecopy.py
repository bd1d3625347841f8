"""Copying raw images: sparse, with progress, stoppable, never half left."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from domsnap.agent.errors import AlreadyExists, Cancelled
from domsnap.agent.storage.filecopy import CHUNK, copy_image


def sparse_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(CHUNK * 3)
        f.write(b"data" * 4096)
        f.seek(size - 4096)
        f.write(b"tail" * 1024)


def test_copy_keeps_content_and_holes_and_reports_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    sparse_image(src, 64 << 20)
    seen: list[tuple[int, int]] = []
    copy_image(src, dst, lambda done, total, rate: seen.append((done, total)))
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 64, "the holes were filled in"
    assert seen[-1][0] == seen[-1][1] > 0


def test_an_existing_destination_is_refused_untouched(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    sparse_image(src, 1 << 20)
    dst.write_text("mine")
    with pytest.raises(AlreadyExists):
        copy_image(src, dst, lambda *_: None)
    assert dst.read_text() == "mine"


def test_a_stopped_copy_leaves_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    sparse_image(src, 64 << 20)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        copy_image(src, dst, lambda *_: None, stop)
    assert not dst.exists()
