"""A non-live snapshot issued straight to QEMU's QMP socket, without domsnapd:
the same steps, in the same order, as agent/drivers/qemu_migration.py's
non-live save with an internal disk snapshot in the pause. bench/vs_libvirt.py
runs it against the domain domsnapd launched (with the agent stopped, since a
QMP socket serves one client) to tell the agent's own overhead.

    migrate-set-capabilities pause-before-switchover=on, background-snapshot=off
    migrate-set-parameters max-bandwidth=2^40
    open FILE O_EXCL, getfd, stop, migrate fd:, wait for pre-switchover,
    blockdev-snapshot-internal-sync, migrate-continue, wait for completed,
    cont, fdatasync

`wait="poll"` waits as the agent does (query-migrate every 100 ms while
active, every 10 ms otherwise); `wait="events"` waits on QEMU's MIGRATION
events instead (capability `events`), the lower bound for these steps.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient

FDNAME = "bench-memory"
UNLIMITED_BANDWIDTH = 1 << 40
POLL = 0.1


@dataclass
class DirectResult:
    wall: float
    pause: float
    image_bytes: int
    fdatasync: float
    migrate: dict[str, Any]


def _stamp(event: Mapping[str, Any]) -> float:
    t = event["timestamp"]
    return float(t["seconds"]) + float(t["microseconds"]) / 1e6


async def _wait_poll(client: QMPClient, until: str) -> None:
    while True:
        info: Any = await client.execute("query-migrate")
        status = info.get("status")
        if status == until:
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
        await asyncio.sleep(POLL if status == "active" else POLL / 10)


async def _wait_event(listener: EventListener, until: str) -> None:
    async for event in listener:
        status = cast(dict[str, Any], event.get("data", {})).get("status")
        if status == until:
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}")


async def _cont(client: QMPClient) -> None:
    # QEMU sends the `completed` event from the migration thread before its
    # main loop leaves the finish-migrate run state; `cont` until then fails
    # with "Migration is not finalized yet".
    for _ in range(1000):
        try:
            await client.execute("cont")
            return
        except ExecuteError as err:
            if "not finalized" not in str(err):
                raise
            await asyncio.sleep(0.001)
    raise RuntimeError("QEMU did not finalize the migration within 1 s")


async def _adapt_downtime(client: QMPClient, passes: EventListener, start_ms: int, cap_ms: int) -> None:
    """Double the downtime limit on every pass after the first, up to `cap_ms`:
    an idle guest converges at a small limit, a busy one still finishes."""
    limit = start_ms
    async for event in passes:
        if cast(dict[str, Any], event["data"])["pass"] >= 2 and limit < cap_ms:
            limit = min(limit * 2, cap_ms)
            await client.execute("migrate-set-parameters", {"downtime-limit": limit})


async def create(
    qmp_socket: Path,
    memory: Path,
    *,
    vdev: str,
    tag: str,
    wait: str = "poll",
    live: bool = False,
    downtime_ms: int = 300,
    adaptive_cap_ms: int = 0,
) -> DirectResult:
    """`live`: pre-copy while the guest runs (QEMU stops it at pre-switchover);
    `downtime_ms`: QEMU's downtime-limit for that; `adaptive_cap_ms`: start at
    `downtime_ms` and double per pass up to this (needs wait="events")."""
    client = QMPClient("bench-direct")
    await client.connect(str(qmp_socket))
    try:
        t0 = time.monotonic()
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "background-snapshot", "state": False},
            {"capability": "events", "state": wait == "events"},
        ]})  # fmt: skip
        await client.execute(
            "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": downtime_ms}
        )
        fd = os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        runstate = EventListener(("STOP", "RESUME"))
        migration = EventListener(("MIGRATION",))
        passes = EventListener(("MIGRATION_PASS",))
        client.register_listener(runstate)
        client.register_listener(migration)
        client.register_listener(passes)
        adapt = None
        try:
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": FDNAME})
            if not live:
                await client.execute("stop")
            await client.execute("migrate", {"uri": f"fd:{FDNAME}"})
            if adaptive_cap_ms:
                adapt = asyncio.create_task(_adapt_downtime(client, passes, downtime_ms, adaptive_cap_ms))
            if wait == "events":
                await _wait_event(migration, "pre-switchover")
            else:
                await _wait_poll(client, "pre-switchover")
            if adapt is not None:
                adapt.cancel()
            await client.execute("blockdev-snapshot-internal-sync", {"device": vdev, "name": tag})
            await client.execute("migrate-continue", {"state": "pre-switchover"})
            if wait == "events":
                await _wait_event(migration, "completed")
            else:
                await _wait_poll(client, "completed")
            await _cont(client)
            size = os.fstat(fd).st_size
            s0 = time.monotonic()
            await asyncio.to_thread(os.fdatasync, fd)
            sync = time.monotonic() - s0
        finally:
            if adapt is not None:
                adapt.cancel()
            os.close(fd)
        wall = time.monotonic() - t0
        events = runstate.clear()
        client.remove_listener(runstate)
        client.remove_listener(migration)
        client.remove_listener(passes)
        stop = next(_stamp(e) for e in events if e["event"] == "STOP")
        resume = [_stamp(e) for e in events if e["event"] == "RESUME"][-1]
        info: Any = await client.execute("query-migrate")
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": False}]})  # fmt: skip
        await client.execute("migrate-set-parameters", {"downtime-limit": 300})
        return DirectResult(wall, resume - stop, size, sync, dict(info))
    finally:
        await client.disconnect()
