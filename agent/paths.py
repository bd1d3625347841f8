"""Where snapshot files may go: under a configured snapshot root, nowhere else.

`confine` is a pure check of one path against the filesystem as it is now.
It returns the path with `..` and every symlink of its existing part
resolved; the caller creates and writes through that returned path, never
through the one it was given, so a symlink cannot redirect it later. The
rules refuse what a root-run agent must never be talked into: a path outside
the roots, into its own state, onto a device, or through a directory that
someone other than root and the agent's own user owns or may write (who can
write a directory can swap what lies under it between the check and the use).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgument

MAX_PATH = 4096
# Never snapshot storage, whatever the roots say, unless a root lies inside one.
SYSTEM_DIRS = (Path("/dev"), Path("/proc"), Path("/sys"))


def confine(path: str, roots: Sequence[Path], forbidden: Sequence[Path] = (), *, what: str = "path") -> Path:
    """`path` resolved, if it lies strictly inside one of `roots`; else InvalidArgument naming the rule.

    Refused: an empty, relative, NUL-holding or over-long path; one that,
    after `..` and the symlinks of its existing prefix are resolved, is not
    inside a root (symlinks out of a root are escapes like any other); one
    inside a `forbidden` directory (the agent's state) or /dev, /proc, /sys,
    unless the matching root itself lies inside that directory; an existing
    file that is not a regular file or directory (device, fifo, socket); an
    unresolvable symlink (a loop); an existing non-directory on the way; a
    directory between the root and the path, root and path included, that
    is owned by another user or writable by another group or by anyone.
    """
    try:
        return _checked(path, roots, forbidden, what)
    except InvalidArgument as err:
        raise InvalidArgument(err.message, reason="PATH_NOT_ALLOWED", path=path) from err.__cause__


def _checked(path: str, roots: Sequence[Path], forbidden: Sequence[Path], what: str) -> Path:
    if not path:
        raise InvalidArgument(f"{what}: empty")
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r}: contains a NUL character")
    try:
        size = len(path.encode())
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"{what} {path!r}: not valid UTF-8") from err
    if size > MAX_PATH:
        raise InvalidArgument(f"{what}: longer than {MAX_PATH} bytes")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")
    try:
        return _confine(path, roots, forbidden, what)
    except OSError as err:
        raise InvalidArgument(f"{what} {path!r}: {err.strerror or err}") from err


def _confine(path: str, roots: Sequence[Path], forbidden: Sequence[Path], what: str) -> Path:
    resolved = Path(os.path.realpath(path))
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    root = next((r for r in real_roots if resolved != r and resolved.is_relative_to(r)), None)
    if root is None:
        where = ", ".join(str(r) for r in roots) or "(none configured)"
        shown = f"{path!r}" if str(resolved) == path else f"{path!r} (that is {resolved})"
        raise InvalidArgument(f"{what} {shown}: outside the snapshot roots: {where}")
    for fence in [*(Path(os.path.realpath(f)) for f in forbidden), *SYSTEM_DIRS]:
        # A root carved out of a fenced directory (the default snapshot root
        # inside the state dir) is allowed; the rest of the directory is not.
        if resolved.is_relative_to(fence) and not root.is_relative_to(fence):
            raise InvalidArgument(f"{what} {path!r}: inside {fence}, which is the agent's own, not for snapshots")
    _check_existing(resolved, root, path, what)
    return resolved


def _check_existing(resolved: Path, root: Path, path: str, what: str) -> None:
    """The part of `resolved` that exists: directories nobody else may write, then a regular file or directory."""
    chain = [root]
    for part in resolved.relative_to(root).parts:
        chain.append(chain[-1] / part)
    for current in chain:
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            # realpath leaves a symlink only where it could not resolve it.
            raise InvalidArgument(f"{what} {path!r}: the symlink {current} cannot be resolved (a loop?)")
        if current == resolved:
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise InvalidArgument(f"{what} {path!r}: {current} is a {_kind(st.st_mode)}, "
                                      "not a regular file or directory")
            if stat.S_ISDIR(st.st_mode):
                _check_trusted(st, current, path, what)
            return
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} {path!r}: {current} is not a directory")
        _check_trusted(st, current, path, what)


def _check_trusted(st: os.stat_result, current: Path, path: str, what: str) -> None:
    """A directory only root and the agent's user may change."""
    if st.st_mode & stat.S_IWOTH:
        raise InvalidArgument(f"{what} {path!r}: {current} is world-writable, so anyone could swap what "
                              "lies under it")
    if st.st_uid not in (0, os.geteuid()):
        raise InvalidArgument(f"{what} {path!r}: {current} is owned by uid {st.st_uid}, who could swap what "
                              "lies under it; only root's and the agent's own directories are used")
    if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        raise InvalidArgument(f"{what} {path!r}: {current} is writable by group {st.st_gid}, who could swap "
                              "what lies under it")


def _kind(mode: int) -> str:
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
