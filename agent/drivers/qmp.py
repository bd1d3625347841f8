"""One QMP session per QEMU process, shared by everything that talks to it.

QEMU's QMP socket serves a single client, so the agent keeps one connection
per domain and lets concurrent callers share it (qemu.qmp multiplexes
commands by id).

The session also knows the guest's run state without asking: QEMU's STOP,
RESUME, SHUTDOWN and GUEST_PANICKED events set it as they are read, which is
before the answer to the command that caused them. A STOP says paused, but
QEMU also stops for an internal or I/O error: the session then asks
query-status in the background, so no caller waits on a QEMU that may be
busy saving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError

from ..errors import FailedPrecondition, Unavailable

# What an event says the run state (query-status's `status`) is now.
_EVENT_STATUS = {"RESUME": "running", "STOP": "paused", "SHUTDOWN": "shutdown", "GUEST_PANICKED": "guest-panicked"}


class _RunState(EventListener):
    """Follows the run state from events; queues none of them (it lives as long as its client)."""

    def __init__(self, stopped: Callable[[], None]) -> None:
        super().__init__(tuple(_EVENT_STATUS))
        self.status: str | None = None
        self.changes = 0
        self._stopped = stopped

    def accept(self, event: Message) -> bool:
        if super().accept(event):
            name = str(event["event"])
            self.status = _EVENT_STATUS[name]
            self.changes += 1
            if name == "STOP":
                self._stopped()
        return False


class QmpSession:
    def __init__(self, socket: Path, name: str) -> None:
        self.socket = socket
        self.name = name
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()
        self._runstate = _RunState(self._stopped)
        self._refining: asyncio.Task[None] | None = None
        # What `settle` set on this connection's QEMU: command -> setting -> value.
        self._settings: dict[str, dict[str, object]] = {}

    async def _connected(self) -> QMPClient:
        async with self._lock:
            if self._client is not None and self._client.runstate.name == "RUNNING":
                return self._client
            client = QMPClient(self.name)
            # The library's catch-all listener keeps every event forever and
            # cannot be removed; a long-lived session must not grow, so it
            # accepts nothing and listeners are per use.
            client.events.event_filter = lambda _event: False
            # Events seen by an earlier connection say nothing of now; nor
            # what it set (the QEMU may be another one).
            self._runstate = _RunState(self._stopped)
            self._settings = {}
            client.register_listener(self._runstate)
            try:
                await asyncio.wait_for(client.connect(str(self.socket)), 10)
            except (OSError, QMPError, TimeoutError) as err:
                raise Unavailable(f"cannot reach QEMU of domain {self.name} at {self.socket}: {err}",
                                  domain=self.name) from err
            self._client = client
            return client

    @property
    def knows_status(self) -> bool:
        """Whether `status()` answers without asking QEMU."""
        return self._client is not None and self._runstate.status is not None

    async def status(self) -> str:
        """The run state as query-status names it; asked of QEMU only when events have not told it."""
        await self._connected()
        return self._runstate.status or await self._ask_status()

    async def _ask_status(self) -> str:
        watch = self._runstate
        changes = watch.changes
        status = str((await self.execute("query-status", timeout=5)).get("status"))
        # An event read while the answer was on its way is newer than it.
        if watch.changes == changes:
            watch.status = status
        return status

    def _stopped(self) -> None:
        if self._client is not None and (self._refining is None or self._refining.done()):
            self._refining = asyncio.get_running_loop().create_task(self._refine(self._client, self._runstate))

    @staticmethod
    async def _refine(client: QMPClient, watch: _RunState) -> None:
        """Which stop a STOP was (paused, or an error state). On the connection
        that saw it, never a new one: a QEMU gone meanwhile tells nothing."""
        changes = watch.changes
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            status = await asyncio.wait_for(client.execute("query-status"), 5)
            if watch.changes == changes:
                watch.status = str(cast(Mapping[str, Any], status).get("status"))

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float = 60) -> Any:
        client = await self._connected()
        try:
            # A deadline on this task, not wait_for's task per command: one
            # loop turn less for each of a create's dozen commands.
            async with asyncio.timeout(timeout):
                return await client.execute(cmd, args)
        except ExecuteError as err:
            raise FailedPrecondition(f"QEMU of domain {self.name} refused {cmd}: {err}", domain=self.name) from err
        except (QMPError, OSError, TimeoutError) as err:
            await self.close()
            raise Unavailable(f"QEMU of domain {self.name} did not answer {cmd}: {err or type(err).__name__}",
                              domain=self.name) from err

    async def settle(self, cmd: str, values: Mapping[str, object],
                     args: Callable[[Mapping[str, object]], Mapping[str, object]]) -> None:
        """`cmd` (a setter: `args` makes its arguments from named settings)
        sent for those of `values` this connection has not already set so:
        QEMU keeps them for its life and the agent is its only client, so a
        create's unchanged migration settings cost no round trip (each ~1 ms
        before the guest's pause, on a loaded host)."""
        done = self._settings.get(cmd, {})
        changed = {k: v for k, v in values.items() if k not in done or done[k] != v}
        if not changed:
            return
        await self.execute(cmd, args(changed))
        # After the answer: a refusal or a lost connection records nothing.
        self._settings.setdefault(cmd, {}).update(changed)

    async def learn(self, cmd: str, query: str, parse: Callable[[Any], Mapping[str, object]]) -> None:
        """What `cmd`'s settings are now (`query` answers them, `parse` names
        them), for `settle`; never over what `settle` set meanwhile (QEMU
        answers in order: a setting set since is newer than the answer)."""
        client = await self._connected()
        values = parse(await self.execute(query))
        if self._client is client:
            done = self._settings.setdefault(cmd, {})
            for name, value in values.items():
                done.setdefault(name, value)

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
        if self._refining is not None:
            self._refining.cancel()
        client, self._client = self._client, None
        self._settings = {}
        if client is not None:
            # The peer may be gone already (QEMU quit); the library then
            # re-raises the reader's EOFError here, which means "closed".
            with contextlib.suppress(Exception):
                await client.disconnect()
