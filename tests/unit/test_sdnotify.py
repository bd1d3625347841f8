"""agent/sdnotify.py against real unix datagram sockets: a path and an
abstract (`@`) address, the watchdog's interval and pings, the environment
it clears for the agent's children."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.agent.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_notifies_a_socket_path(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    assert n.enabled and n.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifies_an_abstract_socket() -> None:
    name = f"domsnap-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier(f"@{name}").status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier.from_environment({})
    assert not n.enabled and n.watchdog is None
    assert not n.ready() and not n.stopping()
    # A socket nobody listens on: a warning, not an error.
    assert not Notifier("/nonexistent/notify.sock").ready()
    assert not Notifier("vsock:2:1234").enabled


def test_environment_is_read_then_cleared_for_the_children(listener: tuple[socket.socket, str]) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/bin"}
    n = Notifier.from_environment(env)
    assert n.enabled and n.watchdog == 2.0
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("500000", "", 0.5),
    ("500000", "1", None),  # the watchdog is another process's
    ("0", "", None),
    ("junk", "", None),
    ("", "", None),
])
def test_watchdog_interval(listener: tuple[socket.socket, str], usec: str, pid: str, expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": usec}
    if pid:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_environment(env).watchdog == expected


def test_watchdog_pings_at_half_the_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)

    async def run() -> list[float]:
        n = Notifier(path, watchdog=0.2)
        loop = asyncio.get_running_loop()
        n.start_watchdog()
        times: list[float] = []
        start = loop.time()
        while len(times) < 4 and loop.time() - start < 5:
            try:
                assert await asyncio.wait_for(loop.sock_recv(sock, 64), 2) == b"WATCHDOG=1"
            except TimeoutError:
                break
            times.append(loop.time())
        await n.stop_watchdog()
        return times

    times = asyncio.run(run())
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Every 0.1 s; generous bounds for a loaded 2-core machine.
    assert all(0.05 < g < 0.5 for g in gaps), gaps
