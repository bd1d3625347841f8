"""Copying disk images: a reflink where the filesystem can, else a sparse
copy that skips holes and reports bytes as it goes."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import AlreadyExists, Cancelled, ResourceExhausted

FICLONE = 0x40049409
CHUNK = 8 << 20


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        pos = end
    return extents


def copy_image(src: Path, dst: Path, progress: Callable[[int, int, float], None],
               stop: threading.Event | None = None) -> bool:
    """Copy `src` to the new file `dst` (fsynced); returns True when it was a reflink.

    Blocking: run it in a thread; setting `stop` ends it (Cancelled) within a
    chunk. `dst` must not exist; on any failure it is removed.
    """
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        try:
            fdout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as err:
            raise AlreadyExists(f"{dst} already exists") from err
        try:
            reflinked = _copy(fin.fileno(), fdout, size, progress, stop)
            os.fsync(fdout)
        except OSError as err:
            os.close(fdout)
            dst.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"copying {src} to {dst}: the disk is full") from err
            raise
        except BaseException:
            os.close(fdout)
            dst.unlink(missing_ok=True)
            raise
        os.close(fdout)
    return reflinked


def _copy(fdin: int, fdout: int, size: int, progress: Callable[[int, int, float], None],
          stop: threading.Event | None) -> bool:
    try:
        fcntl.ioctl(fdout, FICLONE, fdin)
    except OSError:
        pass
    else:
        progress(size, size, 0.0)
        return True
    os.ftruncate(fdout, size)
    extents = _data_extents(fdin, size)
    total = sum(e - s for s, e in extents)
    done = 0
    t0 = last = time.monotonic()
    for start, end in extents:
        pos = start
        while pos < end:
            if stop is not None and stop.is_set():
                raise Cancelled("the copy was stopped")
            n = os.copy_file_range(fdin, fdout, min(CHUNK, end - pos), pos, pos)
            if n == 0:
                break
            pos += n
            done += n
            now = time.monotonic()
            if now - last >= 0.1:
                last = now
                progress(done, total, done / max(now - t0, 1e-6))
    progress(done, total, done / max(time.monotonic() - t0, 1e-6))
    return False
