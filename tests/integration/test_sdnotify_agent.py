"""A real domsnapd under a real sd_notify listener, as systemd runs it with
Type=notify and WatchdogSec=: the test binds the unix datagram socket (a
path, or an abstract `@` name) and gives the agent NOTIFY_SOCKET and
WATCHDOG_USEC. READY=1 comes only once health says SERVING, WATCHDOG=1 comes
at half the interval, and SIGTERM brings STOPPING=1 and a clean exit.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testbed.harness import Agent

WATCHDOG_USEC = 400_000


@dataclass
class Listener:
    """systemd's side: every datagram with its arrival time; at READY=1, what health said then."""

    sock: socket.socket
    agent_address: str
    messages: list[tuple[float, str]] = field(default_factory=list)
    health_at_ready: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data))
            if "READY=1" in data.splitlines():
                self.health_at_ready.append(self._health())

    def _health(self) -> int:
        try:
            with grpc.insecure_channel(self.agent_address) as ch:
                return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status)
        except grpc.RpcError:
            return -1

    def stop(self) -> None:
        self._stop.set()

    def lines(self, line: str) -> list[float]:
        return [t for t, data in self.messages if line in data.splitlines()]


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify"
        sock.bind(str(path))
        yield sock, str(path)
    else:
        name = f"domsnap-notify-{uuid.uuid4().hex[:12]}"
        sock.bind(b"\0" + name.encode())
        yield sock, f"@{name}"
    sock.close()


def test_agent_notifies_ready_watchdog_and_stopping(tmp_path_factory: pytest.TempPathFactory,
                                                      notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    agent = Agent(tmp_path_factory.mktemp("sdn"), env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    listener = Listener(sock, agent.address)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        agent.start()
        deadline = time.monotonic() + 10
        while not listener.health_at_ready and time.monotonic() < deadline:
            time.sleep(0.05)
        # Let a few watchdog periods pass.
        time.sleep(4 * WATCHDOG_USEC / 1e6)
        assert agent.stop() == 0
        deadline = time.monotonic() + 5
        while not listener.lines("STOPPING=1") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if agent.proc is not None:
            agent.stop()
        listener.stop()
        thread.join(5)

    ready = listener.lines("READY=1")
    assert len(ready) == 1, listener.messages
    assert listener.health_at_ready == [health_pb2.HealthCheckResponse.SERVING]
    ready_text = next(d for t, d in listener.messages if t == ready[0])
    assert "STATUS=serving on unix:" in ready_text and "driver qemu" in ready_text
    pings = listener.lines("WATCHDOG=1")
    after_ready = [t for t in pings if t > ready[0]]
    assert len(after_ready) >= 3, listener.messages
    gaps = [b - a for a, b in itertools.pairwise(after_ready)]
    # Half of WATCHDOG_USEC (0.2 s), never near the full interval.
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    stopping = listener.lines("STOPPING=1")
    assert len(stopping) == 1 and stopping[0] > ready[0]
    assert "shutting down" in agent.log.read_text()
