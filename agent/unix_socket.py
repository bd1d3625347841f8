"""The agent's unix socket: a safe directory, mode 0660 and its group, and
the credentials of whoever connects.

gRPC does not tell a servicer who is at the other end of a unix socket (its
peer is just `unix:`). So the agent accepts on the public socket itself,
reads the kernel's credentials of the connecting process (SO_PEERCRED,
SO_PEERGROUPS) and relays the connection, byte for byte, to the gRPC server
on a private socket (in a directory only the agent's user may enter). Each
relayed connection comes from its own autobound abstract address, which gRPC
reports as the call's peer (`unix-abstract:xxxxx`): `PeerTable` maps that
name back to the credentials for as long as the connection lives. The relay
itself: unix_relay.py.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgument

log = logging.getLogger(__name__)

# Linux >= 4.13; Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")
# sun_path holds 108 bytes, NUL included.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class PeerCred:
    """A connecting process as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (gid == self.gid or gid in self.groups)

    def __str__(self) -> str:
        return f"uid={self.uid}({_user_name(self.uid)}) pid={self.pid}"


@functools.lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The peer of a connected unix socket: pid, uid, gid and supplementary groups."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    groups: frozenset[int]
    try:
        groups = _peer_groups(sock)
    except OSError:
        # An old kernel: the group database, which is what the process
        # started with unless it changed its groups since.
        try:
            groups = frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except KeyError:
            groups = frozenset()
    return PeerCred(pid, uid, gid, groups)


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    # 1024 bytes is the most Python's getsockopt takes: 256 groups. A
    # process in more gets ERANGE, and the group database instead.
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def group_id(name: str, what: str) -> int | None:
    """A group's gid, or None with a warning when it does not exist (the agent runs on)."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("%s %r does not exist: %s", what, name,
                    "the socket keeps the agent's group, only root may connect" if what == "socket_group"
                    else "only root is admin on the unix socket")
        return None


def prepare_socket_path(path: Path, gid: int | None) -> None:
    """Make the socket's directory (0750, group `gid`) or check the existing
    one, then clear a stale socket. Refused: a directory writable by others
    or owned by someone else, an ancestor anyone may replace, a symlink or a
    non-socket where the socket goes."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise InvalidArgument(f"unix socket {path}: longer than {_MAX_SOCKET_PATH} bytes")
    directory = path.parent
    created = False
    if not os.path.lexists(directory):
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
            created = True
    _check_directory(directory, path)
    if created:
        os.chown(directory, -1, gid if gid is not None else -1)
        os.chmod(directory, 0o750)  # noqa: S103 - root and the socket's group, by design
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"unix socket {path}: is a symlink; refusing to replace it")
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"unix socket {path}: exists and is not a socket")
    path.unlink()


def _check_directory(directory: Path, sock: Path) -> None:
    real = Path(os.path.realpath(directory))
    me = os.geteuid()
    chain = [Path("/")]
    for part in real.parts[1:]:
        chain.append(chain[-1] / part)
    for current in chain:
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"unix socket {sock}: {current} is not a directory")
        if st.st_uid not in (0, me):
            raise InvalidArgument(f"unix socket {sock}: {current} belongs to uid {st.st_uid}, "
                                  "who could replace the socket")
        world_writable = bool(st.st_mode & stat.S_IWOTH)
        # /tmp-like ancestors (sticky) keep our entries ours; the socket's own directory may not be one.
        if world_writable and (current == real or not st.st_mode & stat.S_ISVTX):
            raise InvalidArgument(f"unix socket {sock}: {current} is world-writable; use a directory of its own "
                                  "(e.g. /run/domsnap)")


def private_socket_path(public: Path) -> Path:
    """Where the gRPC server itself listens: a directory beside the public socket that only we may enter."""
    directory = public.parent / f".{public.name}.private"
    candidate = directory / "grpc.sock"
    if len(os.fsencode(candidate)) > _MAX_SOCKET_PATH:
        raise InvalidArgument(f"unix socket {public}: path too long to keep the private socket beside it "
                              f"({candidate}); use a shorter one")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise InvalidArgument(f"{directory}: expected a directory of the agent's own user with mode 0700")
    with contextlib.suppress(FileNotFoundError):
        candidate.unlink()
    return candidate


@dataclass
class PeerTable:
    """The credentials behind each relayed connection, by the peer name gRPC gives its calls."""

    _by_peer: dict[str, PeerCred] = field(default_factory=dict)

    def lookup(self, peer: str) -> PeerCred | None:
        return self._by_peer.get(peer)

    def add(self, peer: str, cred: PeerCred) -> None:
        self._by_peer[peer] = cred

    def remove(self, peer: str) -> None:
        self._by_peer.pop(peer, None)
