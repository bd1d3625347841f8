"""The QEMU guest agent's protocol (QGA): JSON commands, one per line, over
the domain's virtio-serial channel `org.qemu.guest_agent.0`, which QEMU
serves on a unix socket in the domain's folder.

Not qemu.qmp's QMPClient, which fits QMP and not this: QGA sends no
greeting and negotiates nothing, and its channel keeps whatever an earlier
client left in it (half a command, the late reply to a command whose caller
is gone, a dead agent's freeze). A session therefore starts with
`guest-sync-delimited`: its leading 0xFF byte resets the guest agent's
parser, and its reply comes after a 0xFF of the guest agent's own, past
every stale byte; QMPClient would take those bytes for a protocol error.
Replies carry no id to match them by: a command whose reply was given up
on (a timeout) leaves that reply to be skipped before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition, Unavailable

CHANNEL = "org.qemu.guest_agent.0"
DELIMITER = b"\xff"
# A reply is one JSON line; the guest agent's largest are a few KiB.
MAX_LINE = 1 << 20


class GuestAgent:
    """One connection to a domain's guest agent (the socket serves one client at a time)."""

    def __init__(self, socket: Path, domain: str) -> None:
        self.socket = socket
        self.domain = domain
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        # Replies to commands given up on, still to come before the next one's.
        self._stale = 0
        self._ids = itertools.count(random.randrange(1 << 30))  # noqa: S311 - a sync id, not a secret

    async def sync(self, timeout: float) -> None:
        """Connect (again) and resynchronise; Unavailable if the guest agent
        does not answer within `timeout` seconds."""
        await self.close()
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket, limit=MAX_LINE)
                self._stream = (reader, writer)
                sync_id = next(self._ids)
                writer.write(DELIMITER + _line("guest-sync-delimited", {"id": sync_id}))
                await writer.drain()
                while True:
                    await reader.readuntil(DELIMITER)
                    with contextlib.suppress(ValueError):
                        if json.loads(await reader.readline()).get("return") == sync_id:
                            break
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            await self.close()
            why = "no answer" if isinstance(err, TimeoutError) else str(err) or type(err).__name__
            raise Unavailable(f"domain {self.domain}: no QEMU guest agent answered on its channel {CHANNEL} "
                              f"within {timeout:g} s ({why}): is qemu-guest-agent running in the guest?") from err
        self._stale = 0

    async def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
        """The command's `return`; FailedPrecondition with the guest agent's
        reason if it refused; TimeoutError (the reply then skipped later) if
        it did not answer in time."""
        if self._stream is None:
            await self.sync(timeout)
        assert self._stream is not None
        reader, writer = self._stream
        writer.write(_line(command, args))
        self._stale += 1
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                reply = await _reply(reader)
                self._stale -= 1
                if self._stale == 0:
                    break
        if "error" in reply:
            error = reply["error"]
            raise FailedPrecondition(f"domain {self.domain}: the guest agent refused {command}: "
                                     f"{error.get('desc', error)}")
        return reply.get("return")

    async def close(self) -> None:
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _line(command: str, args: dict[str, Any] | None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if args is not None:
        message["arguments"] = args
    return json.dumps(message).encode() + b"\n"


async def _reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise Unavailable("the guest agent's channel closed")
    try:
        reply = json.loads(line.strip(DELIMITER + b" \r\n"))
    except ValueError as err:
        raise Unavailable(f"the guest agent answered something that is not JSON: {line[:80]!r}") from err
    if not isinstance(reply, dict):
        raise Unavailable(f"the guest agent answered {line[:80]!r}, not an object")
    return reply
