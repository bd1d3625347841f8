"""The memory image's progress is read from the file position QEMU shares
with the agent, through /proc: lseek would wait for QEMU's write to end."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from domsnap.agent.drivers.qemu_migration import position


def test_position_follows_the_shared_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    theirs = os.dup(fd)  # QEMU's copy: the same open file, the same position
    try:
        assert position(fd) == 0
        os.write(theirs, b"x" * 12345)
        assert position(fd) == 12345
        os.lseek(theirs, 100, os.SEEK_SET)
        os.read(theirs, 23)
        assert position(fd) == 123
    finally:
        os.close(theirs)
        os.close(fd)


def test_position_does_not_wait_for_a_write_in_progress(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "image", os.O_WRONLY | os.O_CREAT, 0o600)
    theirs = os.dup(fd)
    started = threading.Event()

    def write() -> None:
        started.set()
        os.write(theirs, bytes(64 << 20))  # one write: it holds the position lock throughout

    writer = threading.Thread(target=write)
    try:
        writer.start()
        started.wait()
        time.sleep(0.005)
        t0 = time.perf_counter()
        seen = position(fd)
        took = time.perf_counter() - t0
        # Answered while the write still ran, with the position from before it.
        assert writer.is_alive(), f"the write ended before position() returned ({took * 1000:.1f} ms)"
        assert seen == 0
    finally:
        writer.join()
        os.close(theirs)
        os.close(fd)
