"""domsnapd's gRPC server: the SnapshotAgent service, health and reflection
on every listen address; SERVING only once the driver answered a probe.

Unix sockets are served through `UnixListener` (the peer's credentials give
its role); TCP through TLS with client certificates required, or plain on
loopback when the config allows it. Interceptors: auth (roles, audit) first,
then errors (statuses, the request log, request size limits).

Under systemd (Type=notify) the agent says READY=1 once health is SERVING,
feeds the watchdog from its event loop and says STOPPING=1 on SIGTERM
(agent/sdnotify.py). `[metrics] listen` adds the Prometheus endpoint
(agent/metrics.py), fed by the operations and the journal's recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from domsnap.v1 import domsnap_pb2, domsnap_pb2_grpc

from . import convert, reflection, runner, transport
from .auth import AuthInterceptor, Authorizer
from .config import AgentConfig, TlsConfig, parse_listen
from .conn_limit import ConnectionLimit, raise_fd_limit
from .drivers import make_driver
from .drivers.base import Hypervisor
from .errors import FailedPrecondition, InvalidArgument
from .interceptor import ErrorInterceptor
from .metrics import Metrics, MetricsServer
from .sdnotify import Notifier
from .service import AgentService
from .servicer import SnapshotAgentServicer
from .storage import Backends
from .unix_relay import UnixListener
from .unix_socket import PeerTable, group_id, prepare_socket_path, private_socket_path

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .auth import Handler

SERVICE_NAME = domsnap_pb2.DESCRIPTOR.services_by_name["SnapshotAgent"].full_name
DRAIN_SECONDS = 30.0


def _read(tls: TlsConfig, name: str) -> bytes:
    path = getattr(tls, name)
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidArgument(f"[tls] {name} {path}: {err.strerror}") from err


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS with client certificates required, checked here so that a bad file fails the start, not a handshake."""
    cert, key, client_ca = (_read(tls, name) for name in ("cert", "key", "client_ca"))
    try:
        ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as err:
        raise InvalidArgument(f"[tls] cert {tls.cert} and key {tls.key}: {err.reason or err} "
                              "(not a certificate and its key?)") from err
    try:
        ssl.create_default_context().load_verify_locations(cadata=client_ca.decode(errors="replace"))
    except (ssl.SSLError, ValueError) as err:
        raise InvalidArgument(f"[tls] client_ca {tls.client_ca}: no CA certificate in it") from err
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


class _ReadyGate(grpc.aio.ServerInterceptor):
    """Calls of the domsnap service wait until the driver has been probed, its
    domains re-attached and the journal recovered (health and reflection do
    not): a call answered earlier would race that start, e.g. a domain created
    while the driver re-attaches the domains it finds, two QMP sessions on a
    socket that serves one."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if details.method.startswith(f"/{SERVICE_NAME}/"):
            await self.open.wait()
        return await continuation(details)


class _Listeners:
    """Every listen address bound to the server; the unix ones through their relay."""

    def __init__(self, config: AgentConfig, server: grpc.aio.Server, peers: PeerTable) -> None:
        self._config = config
        self._server = server
        self._peers = peers
        self.unix: list[UnixListener] = []
        self.bound: list[str] = []
        self._private: Path | None = None
        # One limit for all unix sockets: they share the process's descriptors.
        self._limit = ConnectionLimit(config.max_connections_per_user, raise_fd_limit())

    def bind_tcp(self) -> None:
        creds = server_credentials(self._config.tls) if self._config.tls.enabled else None
        for addr in self._config.listen:
            listen = parse_listen(addr)
            if listen.unix_path is not None:
                continue
            try:
                if creds is not None:
                    port = self._server.add_secure_port(listen.grpc_target, creds)
                    kind = "TLS, client certificates required"
                else:
                    port = self._server.add_insecure_port(listen.grpc_target)
                    kind = "plain TCP: any local user may connect, as `loopback` in [roles]"
            except RuntimeError as err:  # grpc's way of saying the port is taken
                raise FailedPrecondition(f"listen address {addr!r}: cannot bind (in use?): {err}") from err
            if port == 0:
                raise FailedPrecondition(f"listen address {addr!r}: cannot bind (in use?)")
            host = f"[{listen.host}]" if ":" in listen.host else listen.host
            self.bound.append(f"{host}:{port} ({kind})")

    def bind_unix(self, socket_gid: int | None) -> None:
        for addr in self._config.listen:
            path = parse_listen(addr).unix_path
            if path is None:
                continue
            # The directory first: the private socket goes beside the first public one.
            prepare_socket_path(path, socket_gid)
            if self._private is None:
                self._private = private_socket_path(path)
                self._server.add_insecure_port(f"unix:{self._private}")
            self.unix.append(UnixListener(path, self._private, self._peers, socket_gid, self._limit))

    async def start_unix(self) -> None:
        for listener in self.unix:
            await listener.start()
            self.bound.append(f"unix:{listener.public}")

    async def close(self) -> None:
        for listener in self.unix:
            await listener.close()
        if self._private is not None:
            with contextlib.suppress(FileNotFoundError):
                self._private.unlink()
            with contextlib.suppress(OSError):
                self._private.parent.rmdir()


async def serve(config: AgentConfig, driver: Hypervisor | None = None, *, ready: asyncio.Event | None = None,
                notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier.from_environment()
    notifier.start_watchdog()
    try:
        await _serve(config, driver, ready, notifier)
    finally:
        await notifier.stop_watchdog()


async def _serve(config: AgentConfig, driver: Hypervisor | None, ready: asyncio.Event | None,
                 notifier: Notifier) -> None:
    runner.watch_children_by_pidfd()
    driver = driver or await make_driver(config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.snapshot_root.mkdir(parents=True, exist_ok=True)
    backends = Backends(qemu_img=config.qemu.img, max_chain=config.max_chain_depth)
    metrics = Metrics(driver.name, backends) if config.metrics.listen else None
    service = AgentService(config, driver, backends, convert.snapshot_listing, observer=metrics)

    socket_gid = group_id(config.socket_group, "socket_group")
    peers = PeerTable()
    authorizer = Authorizer(config.roles, peers=peers, admin_gid=group_id(config.admin_group, "admin_group"),
                            socket_gid=socket_gid)
    gate = _ReadyGate()
    server = grpc.aio.server(
        interceptors=[gate, AuthInterceptor(authorizer), ErrorInterceptor()],
        options=transport.SERVER_OPTIONS,
    )
    domsnap_pb2_grpc.add_SnapshotAgentServicer_to_server(SnapshotAgentServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable(server, [SERVICE_NAME, health.SERVICE_NAME])
    listeners = _Listeners(config, server, peers)
    listeners.bind_tcp()
    listeners.bind_unix(socket_gid)
    metrics_server = MetricsServer(metrics, config.metrics.listen, socket_gid) if metrics is not None else None
    await server.start()
    try:
        await listeners.start_unix()
        if metrics_server is not None:
            log.info("metrics on %s", await metrics_server.start())
    except BaseException:
        await listeners.close()
        await server.stop(grace=None)
        raise
    log.info("listening on %s", ", ".join(listeners.bound))

    try:
        version = await driver.probe()
        await driver.start()
        recovered = await service.recover()
    except BaseException:
        # No hypervisor to drive (not installed, not answering): leave no
        # socket behind for clients to find dead.
        await server.stop(grace=None)
        await listeners.close()
        if metrics_server is not None:
            await metrics_server.close()
        raise
    if recovered:
        log.info("journal: %d interrupted operation(s) dealt with", recovered)
        if metrics is not None:
            metrics.recovered(recovered)
    # What the start made (modules, the catalogue, the domains) lives as long
    # as the agent: kept out of the collector's full passes, which otherwise
    # walk all of it with the event loop stopped.
    gc.freeze()
    gate.open.set()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("driver %s ready: %s", driver.name, version)
    notifier.ready(f"serving on {', '.join(listeners.bound)}; driver {driver.name}: {version}")
    if ready is not None:
        ready.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        notifier.stopping("draining operations")
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await service.operations.drain(DRAIN_SECONDS)
        await server.stop(grace=2)
        await listeners.close()
        if metrics_server is not None:
            await metrics_server.close()
        await driver.close()
