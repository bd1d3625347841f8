"""Feeding `xl restore` a save image under another header, without a copy.

xl opens the path it is given and reads it front to back, exactly as it reads
a migration stream from a pipe (xl_vmcontrol.c: create_domain; libxl reads
the stream with a datacopier). So to restore an image with a different domain
config (a fresh VM generation ID), the agent hands xl a FIFO and writes into
it the new header, then the image's libxl stream spliced from the file: the
memory image on disk, part of a snapshot, is never changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

CHUNK: Final = 1 << 20
# How often the writer looks for xl having opened the FIFO.
OPEN_POLL: Final = 0.01


def _open_writer(fifo: Path, stop: threading.Event) -> int | None:
    """Open the FIFO for writing once xl opens it for reading; None if `stop`
    comes first (xl failed before it opened its input)."""
    while not stop.is_set():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if err.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            stop.wait(OPEN_POLL)
            continue
        os.set_blocking(fd, True)
        return fd
    return None


def _feed(fd: int, header: bytes, image: Path, offset: int) -> None:
    view = memoryview(header)
    while view:
        view = view[os.write(fd, view):]
    with open(image, "rb") as src:
        pos = offset
        while n := os.splice(src.fileno(), fd, CHUNK, offset_src=pos):
            pos += n


@contextlib.asynccontextmanager
async def fifo_source(image: Path, header: bytes, offset: int, work_dir: Path) -> AsyncIterator[Path]:
    """A FIFO (0600, in `work_dir`) that yields `header` followed by the bytes
    of `image` from `offset` on, for whoever opens it while the context lasts.
    Raises the writer's error, if any, when the context ends normally; a
    reader that stops early (xl failing) is not an error here: xl's own exit
    status says what happened."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fifo = work_dir / f"restore-{secrets.token_hex(6)}.fifo"
    os.mkfifo(fifo, 0o600)
    stop = threading.Event()
    failure: list[OSError] = []

    def writer() -> None:
        try:
            fd = _open_writer(fifo, stop)
            if fd is None:
                return
            try:
                _feed(fd, header, image, offset)
            finally:
                os.close(fd)
        except BrokenPipeError:
            pass
        except OSError as err:
            failure.append(err)

    thread = threading.Thread(target=writer, name="xl-restore-feed", daemon=True)
    thread.start()
    try:
        yield fifo
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        fifo.unlink(missing_ok=True)
    if failure:
        raise failure[0]
