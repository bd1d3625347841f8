"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

A notification is one datagram of `KEY=VALUE` lines sent to the unix socket
named by $NOTIFY_SOCKET: a path, or an abstract socket spelled with a leading
`@`. The watchdog interval comes from $WATCHDOG_USEC (for this process only
when $WATCHDOG_PID, if set, is our pid); the agent pings at half of it.

`Notifier.from_environment()` reads and then removes these variables, as
sd_notify's `unset_environment` does, so that the QEMU and xl processes the
agent starts do not inherit them. Outside systemd every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the `@`.
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    # vsock: and other schemes are not for a service on its own host.
    return None


def _watchdog_seconds(env: MutableMapping[str, str]) -> float | None:
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process of the unit
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Notifier:
    """Sends state changes to systemd; a no-op without $NOTIFY_SOCKET."""

    def __init__(self, notify_socket: str = "", watchdog: float | None = None) -> None:
        self._address = _address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning("NOTIFY_SOCKET=%s: not a unix socket path or @abstract name; not notifying", notify_socket)
        self.watchdog = watchdog if self._address is not None else None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        notifier = cls(env.get("NOTIFY_SOCKET", ""), _watchdog_seconds(env))
        for name in _VARIABLES:
            env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when there is nobody to tell or it could not be sent."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as err:
            # systemd went away or the socket is wrong: the agent runs on.
            log.warning("sd_notify %s: %s", lines[0] if lines else "", err)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def start_watchdog(self) -> None:
        """Ping WATCHDOG=1 at half the interval from the event loop: a loop
        that stops turning stops the pings, and systemd restarts the agent."""
        if self.watchdog is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._ping(self.watchdog / 2), name="sd-watchdog")

    async def _ping(self, every: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(every)

    async def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
