"""Prometheus metrics: what the agent did, read from finished operations.

`Metrics` is the operations' observer (agent/operations.py tells it when an
operation starts and when it has finished) and counts the journal's
recoveries at start; nothing else in the agent knows it exists. The
endpoint (`MetricsServer`) is off unless `[metrics] listen` names a loopback
HOST:PORT or a unix socket: the metrics carry no secrets but the endpoint
has no authentication.

The HTTP side is a few lines on the agent's own event loop (GET /metrics,
one request per connection) rather than prometheus_client's threaded
server, which cannot listen on a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from domsnap import __version__

from .catalogue import Entry
from .config import parse_metrics_listen
from .errors import InvalidArgument
from .operations import Operation, OpKind
from .storage import Backends
from .unix_socket import prepare_socket_path

log = logging.getLogger(__name__)

# Operations take seconds to an hour (a memory image of a large guest on a slow disk).
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# A guest pause: tens of milliseconds (live) to the time a memory image takes to write (not live).
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_MAX_REQUEST_HEAD = 16 * 1024
_REQUEST_TIMEOUT = 5.0


class Metrics:
    """The agent's metrics, in a registry of their own."""

    def __init__(self, driver: str = "", backends: Backends | None = None) -> None:
        # Which files of a snapshot are copies of a disk is the backends' to say.
        self._backends = backends or Backends()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        Info("domsnap_agent", "The agent's version and driver", registry=r).info(
            {"version": __version__, "driver": driver})
        self.operations = Counter("domsnap_operations", "Operations finished, by kind and outcome",
                                  ("kind", "outcome"), registry=r)
        self.duration = Histogram("domsnap_operation_duration_seconds", "Operations' time from start to end",
                                  ("kind",), buckets=DURATION_BUCKETS, registry=r)
        self.pause = Histogram("domsnap_guest_pause_seconds",
                               "How long a successful snapshot-create kept the guest paused (the manifest's downtime)",
                               ("live",), buckets=PAUSE_BUCKETS, registry=r)
        self.written = Counter("domsnap_bytes_written",
                               "Bytes successful creates wrote: memory images, and copies of disks (raw, LVM external)",
                               ("what",), registry=r)
        self.running = Gauge("domsnap_operations_running", "Operations running now", ("kind",), registry=r)
        self.recoveries = Counter("domsnap_journal_recoveries",
                                  "Operations an earlier agent left unfinished, completed or rolled back at start",
                                  registry=r)
        for kind in OpKind:
            # Present from the start, so that rate() and absent() behave.
            self.running.labels(kind=kind.value)
            self.duration.labels(kind=kind.value)
        self.written.labels(what="memory")
        self.written.labels(what="disk_copy")

    # ------------------------------------------------ the operations' observer

    def started(self, op: Operation) -> None:
        self.running.labels(kind=op.kind.value).inc()

    def finished(self, op: Operation) -> None:
        kind = op.kind.value
        self.running.labels(kind=kind).dec()
        self.operations.labels(kind=kind, outcome=op.state.value).inc()
        if op.finished_at is not None:
            self.duration.labels(kind=kind).observe(max(op.finished_at - op.started_at, 0.0))
        if op.kind is OpKind.CREATE and op.error is None and isinstance(op.result, Entry):
            m = op.result.manifest
            self.pause.labels(live=str(m.live).lower()).observe(m.downtime)
            self.written.labels(what="memory").inc(m.memory_bytes)
            self.written.labels(what="disk_copy").inc(sum(
                _allocated(f) for d in m.disks for f in self._backends.for_record(d).copies(d)))

    def recovered(self, count: int) -> None:
        self.recoveries.inc(count)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class MetricsServer:
    """GET /metrics over HTTP/1.x on a loopback address or a unix socket."""

    def __init__(self, metrics: Metrics, listen: str, socket_gid: int | None) -> None:
        self._metrics = metrics
        self._listen = parse_metrics_listen(listen)
        self._gid = socket_gid
        self._server: asyncio.AbstractServer | None = None
        self.bound = ""

    async def start(self) -> str:
        """Listen; returns the URL (port 0 resolved) or the socket."""
        path = self._listen.unix_path
        try:
            if path is not None:
                self._server = await self._start_unix(path)
                self.bound = f"unix:{path}"
            else:
                self._server = await asyncio.start_server(self._serve, self._listen.host, self._listen.port,
                                                          limit=_MAX_REQUEST_HEAD)
                port = self._server.sockets[0].getsockname()[1]
                host = f"[{self._listen.host}]" if ":" in self._listen.host else self._listen.host
                self.bound = f"http://{host}:{port}/metrics"
        except OSError as err:
            raise InvalidArgument(f"[metrics] listen {self._listen.grpc_target}: {err.strerror or err}") from err
        return self.bound

    async def _start_unix(self, path: Path) -> asyncio.AbstractServer:
        prepare_socket_path(path, self._gid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), 0o660)
            sock.bind(str(path))
            os.chown(path, -1, self._gid if self._gid is not None else -1, follow_symlinks=False)
            os.chmod(path, 0o660)
            return await asyncio.start_unix_server(self._serve, sock=sock, limit=_MAX_REQUEST_HEAD)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        if self._listen.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._listen.unix_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            status, body, content_type, send_body = self._answer(head.decode("latin-1"))
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1") + (body if send_body else b""))
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            log.debug("metrics request dropped: %r", err)
        finally:
            writer.close()

    def _answer(self, head: str) -> tuple[str, bytes, str, bool]:
        request, *lines = head.split("\r\n")
        parts = request.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", b"bad request\n", "text/plain", True
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain", True
        if target not in ("/metrics", "/"):
            return "404 Not Found", b"GET /metrics\n", "text/plain", method == "GET"
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body, content_type = self._metrics.exposition(headers.get("accept", ""))
        return "200 OK", body, content_type, method == "GET"
