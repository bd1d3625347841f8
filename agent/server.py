"""domsnapd's gRPC server: the SnapshotAgent service, health and reflection
on every listen address; SERVING only once the driver answered a probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from domsnap.agent.config import AgentConfig, parse_listen
from domsnap.agent.drivers import make_driver
from domsnap.agent.drivers.base import Hypervisor
from domsnap.agent.interceptor import ErrorInterceptor
from domsnap.agent.service import AgentService
from domsnap.agent.servicer import SnapshotAgentServicer
from domsnap.agent.storage import Backends
from domsnap.v1 import domsnap_pb2, domsnap_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = domsnap_pb2.DESCRIPTOR.services_by_name["SnapshotAgent"].full_name
DRAIN_SECONDS = 30.0


def _bind(server: grpc.aio.Server, addr: str) -> None:
    listen = parse_listen(addr)
    if listen.unix_path is not None:
        listen.unix_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with contextlib.suppress(FileNotFoundError):
            listen.unix_path.unlink()
    server.add_insecure_port(listen.grpc_target)


async def serve(config: AgentConfig, driver: Hypervisor | None = None, *, ready: asyncio.Event | None = None) -> None:
    driver = driver or make_driver(config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.snapshot_root.mkdir(parents=True, exist_ok=True)
    service = AgentService(config, driver, Backends(qemu_img=config.qemu.img, max_chain=config.max_chain_depth))

    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    domsnap_pb2_grpc.add_SnapshotAgentServicer_to_server(SnapshotAgentServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    for addr in config.listen:
        _bind(server, addr)
    await server.start()
    for addr in config.listen:
        if (path := parse_listen(addr).unix_path) is not None:
            # Only root and the socket's group may drive an agent that runs as root.
            os.chmod(path, 0o660)
    log.info("listening on %s", ", ".join(config.listen))

    version = await driver.probe()
    await driver.start()
    if recovered := await service.recover():
        log.info("journal: %d interrupted operation(s) dealt with", recovered)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("driver %s ready: %s", driver.name, version)
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
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await service.operations.drain(DRAIN_SECONDS)
        await server.stop(grace=2)
        await driver.close()
        for addr in config.listen:
            if (path := parse_listen(addr).unix_path) is not None:
                with contextlib.suppress(FileNotFoundError):
                    Path(path).unlink()
