"""One QMP session per QEMU process, shared by everything that talks to it.

QEMU's QMP socket serves a single client, so the agent keeps one connection
per domain and lets concurrent callers share it (qemu.qmp multiplexes
commands by id).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from domsnap.agent.errors import FailedPrecondition, Unavailable


class QmpSession:
    def __init__(self, socket: Path, name: str) -> None:
        self.socket = socket
        self.name = name
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> QMPClient:
        async with self._lock:
            if self._client is not None and self._client.runstate.name == "RUNNING":
                return self._client
            client = QMPClient(self.name)
            # The library's catch-all listener keeps every event forever and
            # cannot be removed; a long-lived session must not grow, so it
            # accepts nothing and listeners are per use.
            client.events.event_filter = lambda _event: False
            try:
                await asyncio.wait_for(client.connect(str(self.socket)), 10)
            except (OSError, QMPError, TimeoutError) as err:
                raise Unavailable(f"cannot reach QEMU of domain {self.name} at {self.socket}: {err}") from err
            self._client = client
            return client

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float = 60) -> Any:
        client = await self._connected()
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        except ExecuteError as err:
            raise FailedPrecondition(f"QEMU of domain {self.name} refused {cmd}: {err}") from err
        except (QMPError, OSError, TimeoutError) as err:
            await self.close()
            raise Unavailable(f"QEMU of domain {self.name} did not answer {cmd}: {err or type(err).__name__}") from err

    async def send_fd(self, fdname: str, fd: int) -> None:
        """Hand QEMU an open file (QMP getfd) so it never opens paths itself."""
        client = await self._connected()
        client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": fdname})

    @contextlib.asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventListener]:
        client = await self._connected()
        listener = EventListener(names)
        client.register_listener(listener)
        try:
            yield listener
        finally:
            client.remove_listener(listener)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # The peer may be gone already (QEMU quit); the library then
            # re-raises the reader's EOFError here, which means "closed".
            with contextlib.suppress(Exception):
                await client.disconnect()


def event_time(event: Mapping[str, Any]) -> float:
    stamp = cast(Mapping[str, int], event["timestamp"])
    return stamp["seconds"] + stamp["microseconds"] / 1e6
