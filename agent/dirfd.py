"""Removing a snapshot's files through a handle on its folder, not by name.

The folder is opened once, without following a symlink, and every file in it
is removed relative to that handle: a folder swapped for a symlink after the
checks (by whoever could write its parent) makes nothing outside it go.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path


def _open(folder: Path) -> int | None:
    """A handle on `folder`, or None when it is gone or is no longer a folder (a symlink, a file)."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:  # a symlink where the folder was
            return None
        raise


def unlink(path: Path, folder: Path) -> None:
    """Remove `path`: through `folder`'s handle when it lies directly inside it, else by name."""
    if path.parent != folder:
        path.unlink(missing_ok=True)
        return
    if (fd := _open(folder)) is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=fd)
    finally:
        os.close(fd)


def remove_files(folder: Path, keep: Callable[[Path], bool]) -> None:
    """Every file directly inside `folder` but those `keep` names, then the folder if it is left empty."""
    if (fd := _open(folder)) is None:
        return
    try:
        for name in os.listdir(fd):
            if keep(folder / name):
                continue
            # A directory inside (never one of ours) stays, and so the folder.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        folder.rmdir()
