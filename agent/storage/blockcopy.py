"""Copying a block device (an LV) to a sparse file and back, with progress.

filecopy cannot serve here: a block device has no st_size, no SEEK_DATA and
no reflink. Blocking: run these in a thread.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import AlreadyExists, FailedPrecondition, ResourceExhausted

CHUNK: Final = 4 << 20
# Zeros are looked for in blocks of this size, each left a hole in the copy.
HOLE: Final = 64 << 10
_ZERO: Final = bytes(HOLE)

Progress = Callable[[int, int, float], None]
CopyFunction = Callable[[Path, Path, Progress], None]


def _size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def device_size(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _size(fd)
    finally:
        os.close(fd)


def _data_runs(chunk: bytes) -> list[tuple[int, int]]:
    """The [start, end) runs of `chunk` that are not whole zero blocks; the
    rest stays a hole in the (pre-sized) file: sparse copies."""
    runs: list[tuple[int, int]] = []
    for start in range(0, len(chunk), HOLE):
        block = chunk[start : start + HOLE]
        if block == _ZERO[: len(block)]:
            continue
        end = start + len(block)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _copy(fdin: int, fdout: int, size: int, progress: Progress, *, skip_zeros: bool) -> None:
    t0 = last = time.monotonic()
    done = 0
    while done < size:
        chunk = os.pread(fdin, min(CHUNK, size - done), done)
        if not chunk:
            raise OSError(errno.EIO, f"short read at offset {done} of {size}")
        for start, end in _data_runs(chunk) if skip_zeros else [(0, len(chunk))]:
            _pwrite_all(fdout, memoryview(chunk)[start:end], done + start)
        done += len(chunk)
        now = time.monotonic()
        if now - last >= 0.1 or done == size:
            last = now
            progress(done, size, done / max(now - t0, 1e-6))
    os.fsync(fdout)


def device_to_file(device: Path, dst: Path, progress: Progress) -> None:
    """Copy `device` into the new sparse file `dst`; on any failure `dst` is removed."""
    fdin = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = _size(fdin)
        try:
            fdout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as err:
            raise AlreadyExists(f"{dst} already exists") from err
        try:
            os.ftruncate(fdout, size)
            _copy(fdin, fdout, size, progress, skip_zeros=True)
        except BaseException as err:
            os.close(fdout)
            dst.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"copying {device} to {dst}: the disk is full") from err
            raise
        os.close(fdout)
    finally:
        os.close(fdin)


def file_to_device(src: Path, device: Path, progress: Progress) -> None:
    """Write the whole of `src` over `device` (zeros included: the device holds old data)."""
    fdin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fdout = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            size, room = _size(fdin), _size(fdout)
            if size != room:
                raise FailedPrecondition(f"{src} holds {size} bytes but {device} has {room}: "
                                         "the volume was resized since the snapshot")
            _copy(fdin, fdout, size, progress, skip_zeros=False)
        finally:
            os.close(fdout)
    finally:
        os.close(fdin)
