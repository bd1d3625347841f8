"""A held group member's memory image goes through a pipe the agent drains:
holding it paces the writer to a trickle, releasing it lets the writer on at
once, and a relay that is stopped leaves a writer failing, not blocked."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from domsnap.agent.drivers.pipe_relay import PIPE_BYTES, TRICKLE, TRICKLE_BYTES, Relay

CHUNK = 256 << 10
PATTERN = bytes(range(256)) * (CHUNK // 256)


@dataclass
class Writer:
    """QEMU's migration thread: blocking writes into the pipe, then it closes its end."""

    fd: int
    total: int
    done: threading.Event = field(default_factory=threading.Event)
    errors: list[OSError] = field(default_factory=list)

    def run(self) -> None:
        try:
            for _ in range(self.total // CHUNK):
                os.write(self.fd, PATTERN)
        except OSError as err:
            self.errors.append(err)
        finally:
            os.close(self.fd)
            self.done.set()


@contextmanager
def relay_to(tmp_path: Path, total: int, *, held: bool) -> Iterator[tuple[Relay, Writer, int]]:
    """A relay into a fresh image (which starts with 6 bytes: the relay writes at the file's position, as
    QEMU would), held or not, and a writer of `total` bytes on the pipe."""
    image = os.open(tmp_path / "image", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(image, b"header")
    relay = Relay(image)
    if held:
        relay.hold()
    writer = Writer(os.dup(relay.write_end), total)
    relay.close()
    thread = threading.Thread(target=writer.run)
    thread.start()
    try:
        yield relay, writer, image
    finally:
        thread.join()
        os.close(image)


def test_everything_written_reaches_the_image_at_its_position(tmp_path: Path) -> None:
    with relay_to(tmp_path, 8 << 20, held=False) as (relay, writer, _):
        asyncio.run(relay.drained())
    data = (tmp_path / "image").read_bytes()
    assert not writer.errors and relay.error is None
    assert data[:6] == b"header" and len(data) == 6 + (8 << 20)
    assert data[6:6 + CHUNK] == PATTERN


def test_a_hold_paces_the_writer_and_a_release_lets_it_on(tmp_path: Path) -> None:
    with relay_to(tmp_path, 16 << 20, held=True) as (relay, writer, image):
        # Held: past what fills the pipe at once, only a trickle gets through.
        assert not writer.done.wait(0.3)
        held_at = os.fstat(image).st_size
        time.sleep(0.5)
        assert os.fstat(image).st_size - held_at <= TRICKLE * 0.5 + 2 * TRICKLE_BYTES
        assert os.fstat(image).st_size <= 6 + 2 * PIPE_BYTES + TRICKLE
        relay.release()
        assert writer.done.wait(10), "the writer was not let on"
        asyncio.run(relay.drained())
    assert not writer.errors and os.path.getsize(tmp_path / "image") == 6 + (16 << 20)


def test_a_stopped_relay_leaves_its_writer_failing_not_blocked(tmp_path: Path) -> None:
    with relay_to(tmp_path, 16 << 20, held=True) as (relay, writer, _):
        assert not writer.done.wait(0.3)
        asyncio.run(asyncio.wait_for(relay.stop(), 5))
        assert writer.done.wait(5)
    assert writer.errors and isinstance(writer.errors[0], BrokenPipeError)


def test_a_relay_whose_writer_never_comes_ends_when_stopped(tmp_path: Path) -> None:
    # QEMU was handed the pipe but never started the save: it keeps the write end open.
    image = os.open(tmp_path / "image", os.O_WRONLY | os.O_CREAT, 0o600)
    relay = Relay(image)
    theirs = os.dup(relay.write_end)
    relay.close()
    try:
        asyncio.run(asyncio.wait_for(relay.stop(), 5))
    finally:
        os.close(theirs)
        os.close(image)
