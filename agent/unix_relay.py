"""The unix socket's relay: accepts on the public socket, learns the
caller's credentials, connects to the gRPC server's private socket and
copies bytes both ways.

Each readiness is one callback of the event loop doing a non-blocking recv
and send: a byte crosses the loop once. (Streams took three passes of the
loop per chunk: the protocol's callback, the pump task's wake-up, its
drain. A relay thread of its own was worse under load: it needs the GIL
back after every system call, and waits up to the 5 ms switch interval for
it whenever the loop is busy; in one loaded run, a health check's p99 was
9x that on the gRPC server's own socket.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
from pathlib import Path

from .conn_limit import ConnectionLimit
from .unix_socket import PeerTable, peer_credentials, prepare_socket_path

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class _Flow:
    """One direction of one connection; the bytes its destination would not take yet."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket, uid: int, peer: str) -> None:
        self.client = client
        self.upstream = upstream
        self.uid = uid
        self.peer = peer
        self.flows = (_Flow(client, upstream), _Flow(upstream, client))
        # What the loop watches each socket for (selectors' EVENT_READ | EVENT_WRITE).
        self.watched: dict[socket.socket, int] = {}

    def interest(self, sock: socket.socket) -> int:
        """Read `sock` once what was read from it has been passed on; write to it while something waits."""
        events = 0
        for flow in self.flows:
            if flow.src is sock and not flow.pending:
                events |= selectors.EVENT_READ
            if flow.dst is sock and flow.pending:
                events |= selectors.EVENT_WRITE
        return events


class UnixListener:
    """The public socket; every connection relayed to the gRPC server's private socket."""

    def __init__(self, public: Path, private: Path, peers: PeerTable, gid: int | None,
                 limit: ConnectionLimit) -> None:
        self.public = public
        self._private = str(private)
        self._peers = peers
        self._gid = gid
        self._limit = limit
        self._listening: socket.socket | None = None
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        prepare_socket_path(self.public, self._gid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket file takes the unbound socket's mode (less the
            # umask): never connectable by others, not even for an instant.
            os.fchmod(sock.fileno(), 0o660)
            sock.bind(str(self.public))
            os.chown(self.public, -1, self._gid if self._gid is not None else -1, follow_symlinks=False)
            os.chmod(self.public, 0o660)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._listening = sock
        self._loop.add_reader(sock, self._accept)

    async def close(self) -> None:
        """Every connection closed, then the socket."""
        if self._listening is not None:
            self._loop.remove_reader(self._listening)
            self._listening.close()
            self._listening = None
        for conn in list(self._connections):
            self._close(conn)
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()

    def _accept(self) -> None:
        assert self._listening is not None
        try:
            client, _ = self._listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # e.g. EMFILE: the limits below are meant to keep that away
            log.debug("unix socket %s: accept failed: %s", self.public, err)
            return
        try:
            cred = peer_credentials(client)
        except OSError as err:
            log.debug("connection to %s gone before it was read: %s", self.public, err)
            client.close()
            return
        if not self._limit.admit(cred.uid):
            client.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("")  # autobind: a fresh abstract name, gRPC's peer for this connection
            peer = "unix-abstract:" + upstream.getsockname()[1:].decode()
            # Known before gRPC can see a call from it.
            self._peers.add(peer, cred)
            # gRPC accepts on its own threads: its backlog empties at once.
            upstream.connect(self._private)
        except OSError as err:
            log.warning("unix socket %s: cannot reach the gRPC server's socket: %s", self.public, err)
            upstream.close()
            client.close()
            self._limit.release(cred.uid)
            return
        conn = _Connection(client, upstream, cred.uid, peer)
        self._connections.add(conn)
        for sock in (client, upstream):
            sock.setblocking(False)
            self._watch(conn, sock)

    def _serve(self, conn: _Connection, sock: socket.socket, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE:
                for flow in conn.flows:
                    if flow.dst is sock and flow.pending:
                        flow.pending = flow.pending[sock.send(flow.pending):]
            if events & selectors.EVENT_READ:
                flow = conn.flows[0] if conn.flows[0].src is sock else conn.flows[1]
                data = sock.recv(_CHUNK)
                if not data:
                    # One side gone: the connection ends (gRPC has no use for a half-closed one).
                    self._close(conn)
                    return
                try:
                    flow.pending = data[flow.dst.send(data):]
                except BlockingIOError:
                    flow.pending = data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            log.debug("relay of %s ended: %s", conn.peer, err)
            self._close(conn)
            return
        for s in (conn.client, conn.upstream):
            self._watch(conn, s)

    def _watch(self, conn: _Connection, sock: socket.socket) -> None:
        wanted, watched = conn.interest(sock), conn.watched.get(sock, 0)
        if wanted & selectors.EVENT_READ and not watched & selectors.EVENT_READ:
            self._loop.add_reader(sock, self._serve, conn, sock, selectors.EVENT_READ)
        elif watched & selectors.EVENT_READ and not wanted & selectors.EVENT_READ:
            self._loop.remove_reader(sock)
        if wanted & selectors.EVENT_WRITE and not watched & selectors.EVENT_WRITE:
            self._loop.add_writer(sock, self._serve, conn, sock, selectors.EVENT_WRITE)
        elif watched & selectors.EVENT_WRITE and not wanted & selectors.EVENT_WRITE:
            self._loop.remove_writer(sock)
        conn.watched[sock] = wanted

    def _close(self, conn: _Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        for sock in (conn.client, conn.upstream):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()
        self._peers.remove(conn.peer)
        self._limit.release(conn.uid)
