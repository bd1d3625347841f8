"""The QMP session's run state, kept from QEMU's events: the real qemu.qmp
client against a scripted QMP server on a unix socket, which counts the
query-status calls it answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from domsnap.agent.drivers.qmp import QmpSession

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as QMP clients send them: one after another, not one per line."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


class FakeQemu:
    def __init__(self) -> None:
        self.status = "running"
        self.queries = 0
        self.commands: list[tuple[str, Any]] = []
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.send(GREETING)
        async for msg in _messages(reader):
            if msg["execute"].startswith("migrate-"):
                self.commands.append((msg["execute"], msg.get("arguments")))
            ret: Any = {}
            if msg["execute"] == "query-status":
                self.queries += 1
                ret = {"status": self.status, "running": self.status == "running"}
            elif msg["execute"] == "query-migrate-parameters":
                ret = {"a": 1, "b": 2}
            elif msg["execute"] == "stop":
                # As QEMU does: the event goes out before the command's answer.
                self.status = "paused"
                self.event("STOP")
            elif msg["execute"] == "cont":
                self.status = "running"
                self.event("RESUME")
            self.send({"return": ret, **({"id": msg["id"]} if "id" in msg else {})})
            await writer.drain()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(json.dumps(msg).encode() + b"\n")

    def event(self, name: str) -> None:
        self.send({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


@contextlib.asynccontextmanager
async def _served(tmp_path: Path) -> AsyncIterator[tuple[FakeQemu, QmpSession]]:
    """A scripted QEMU on a unix socket, and a session to it."""
    qemu = FakeQemu()
    sock = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(qemu.serve, str(sock))
    session = QmpSession(sock, "g")
    try:
        yield qemu, session
    finally:
        await session.close()
        server.close()
        await server.wait_closed()


def test_status_is_asked_once_then_follows_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with _served(tmp_path) as (qemu, session):
            assert not session.knows_status
            assert await session.status() == "running"
            assert session.knows_status
            assert await session.status() == "running"
            assert qemu.queries == 1, "a known run state was asked again"
            await session.execute("cont")
            assert await session.status() == "running" and qemu.queries == 1
            # STOP says paused at once; which stop it was is asked in the background.
            await session.execute("stop")
            assert await session.status() == "paused"
            await until(lambda: qemu.queries == 2)
            assert await session.status() == "paused" and qemu.queries == 2
            # QEMU stopping on its own for an error: the caller never asks, the session finds out.
            await session.execute("cont")
            qemu.status = "internal-error"
            qemu.event("STOP")
            await until(lambda: qemu.queries == 3)
            assert await session.status() == "internal-error"
            # A state change QEMU makes on its own (here: a guest panic) is seen without asking.
            qemu.event("GUEST_PANICKED")
            await until(lambda: session._runstate.status == "guest-panicked")
            assert await session.status() == "guest-panicked" and qemu.queries == 3
            # A new connection knows nothing of what the old one saw.
            await session.close()
            qemu.status = "running"
            assert await session.status() == "running" and qemu.queries == 4

    asyncio.run(main())


def test_settings_are_sent_once_per_connection(tmp_path: Path) -> None:
    """`settle` skips the settings this connection already set to the same value, and sends the rest alone."""
    async def main() -> None:
        async with _served(tmp_path) as (qemu, session):
            await session.settle("migrate-set-parameters", {"a": 1, "b": 2}, dict)
            await session.settle("migrate-set-parameters", {"a": 1, "b": 2}, dict)
            assert qemu.commands == [("migrate-set-parameters", {"a": 1, "b": 2})]
            await session.settle("migrate-set-parameters", {"a": 1, "b": 3}, dict)
            assert qemu.commands[-1] == ("migrate-set-parameters", {"b": 3})
            # A new connection (perhaps to a new QEMU) sets everything again.
            await session.close()
            await session.settle("migrate-set-parameters", {"a": 1, "b": 3}, dict)
            assert qemu.commands[-1] == ("migrate-set-parameters", {"a": 1, "b": 3}) and len(qemu.commands) == 3
            # What QEMU has (learnt) needs no setting; what was set since is not overwritten by it.
            await session.close()
            await session.settle("migrate-set-parameters", {"b": 3}, dict)
            await session.learn("migrate-set-parameters", "query-migrate-parameters", dict)
            await session.settle("migrate-set-parameters", {"a": 1, "b": 3}, dict)
            assert qemu.commands[-1] == ("migrate-set-parameters", {"b": 3}) and len(qemu.commands) == 4
            await session.settle("migrate-set-parameters", {"a": 5}, dict)
            assert qemu.commands[-1] == ("migrate-set-parameters", {"a": 5})

    asyncio.run(main())
