"""Durable small files: what the agent's state and manifests are made of."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


def _sync(path: Path, sync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so that a rename in it is durable)."""
    _sync(path, os.fsync)


def make_durable(paths: Iterable[Path]) -> None:
    """Files that write_atomic left to the page cache (not `durable`), durable
    now: each file, then each directory that holds one (its rename)."""
    paths = list(paths)
    for path in paths:
        fsync_path(path)
    for directory in dict.fromkeys(path.parent for path in paths):
        fsync_path(directory)


def sync_data(paths: Iterable[Path]) -> None:
    """fdatasync each file that exists: its content durable (its name is its directory's)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            _sync(path, os.fdatasync)


def write_atomic(path: Path, text: str, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `text`: written beside it, fsynced, renamed over it,
    the directory fsynced. A crash leaves the old content or the new, never half.
    Private to root and the agent by default: the state dir holds domains'
    configs and the journal. Not `durable`: no fsync, so the new content
    survives the agent's death (it is in the page cache), not a power cut."""
    put_staged(stage(path, text, mode=mode, durable=durable), durable=durable)


@dataclass(frozen=True)
class Staged:
    """write_atomic's first half: the new content beside `path`, not yet in its place."""

    tmp: Path
    path: Path


def stage(path: Path, text: str, *, mode: int = 0o600, durable: bool = True) -> Staged:
    """Write `text` beside `path` (fsynced when `durable`), for put_staged to
    rename over it: a caller may do this while it still waits for what must
    be durable before the new content may appear."""
    tmp = path.with_name(path.name + ".tmp")
    # No following a symlink planted at the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    with open(fd, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    return Staged(tmp, path)


def put_staged(staged: Staged, *, durable: bool = True) -> None:
    """The staged content in its place (the directory fsynced when `durable`)."""
    os.replace(staged.tmp, staged.path)
    if durable:
        fsync_path(staged.path.parent)


class NotRegularFile(OSError):
    """What `read_regular` found is a link, fifo, device or socket, or is too big."""


def read_regular(path: Path, limit: int) -> bytes:
    """The content of `path`, if it is a regular file of at most `limit` bytes.

    For files a caller or another user may have planted: a symlink is not
    followed (ELOOP), opening a fifo does not wait for a writer (O_NONBLOCK),
    and nothing but a regular file is read, so /dev/zero cannot fill memory;
    at most `limit` + 1 bytes are ever read, whatever the file grows to.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotRegularFile(f"{path} is a symlink") from err
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise NotRegularFile(f"{path} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
def copy_atomic(source: Path, path: Path) -> None:
    """Replace `path` with a copy of `source`, as write_atomic does: old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(source, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
