"""The unix socket's accepts and bytes, on one thread of their own.

Relaying on the event loop put each call's bytes behind whatever else the
loop was doing: measured under a concurrent snapshot, the relay made a
health check's p99 several times that of the same check on the gRPC
server's own socket. Here one thread accepts on the public socket, learns
the caller's credentials, connects to the private socket and copies bytes
both ways with non-blocking sockets and a selector: one thread however many
connections there are, and the event loop never sees these sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import threading
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
        self.closed = False

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
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listening: socket.socket | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay {public}", daemon=True)

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
        self._listening = sock
        self._selector.register(sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()

    async def close(self) -> None:
        """Every connection closed, then the socket."""
        if self._thread.is_alive():
            self._stopping = True
            self._wake_w.send(b"x")
            await asyncio.to_thread(self._thread.join)
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select():
                    if key.fileobj is self._listening:
                        self._accept()
                    elif isinstance(key.data, _Connection):
                        assert isinstance(key.fileobj, socket.socket)
                        self._serve(key.data, key.fileobj, events)
        except Exception:
            log.exception("unix socket %s: the relay failed; no more connections are served", self.public)
        finally:
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, _Connection):
                    self._close(key.data)
            self._selector.close()
            for sock in (self._listening, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

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
        for sock in (client, upstream):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, conn)

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
            self._watch(s, conn)

    def _watch(self, sock: socket.socket, conn: _Connection) -> None:
        # A socket with nothing to do is not watched: selectors take no empty interest.
        events = conn.interest(sock)
        try:
            watched = self._selector.get_key(sock).events
        except KeyError:
            watched = 0
        if events == watched:
            return
        if not watched:
            self._selector.register(sock, events, conn)
        elif events:
            self._selector.modify(sock, events, conn)
        else:
            self._selector.unregister(sock)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.upstream):
            with contextlib.suppress(KeyError):
                self._selector.unregister(sock)
            sock.close()
        self._peers.remove(conn.peer)
        self._limit.release(conn.uid)
