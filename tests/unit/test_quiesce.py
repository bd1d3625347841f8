"""Guest quiesce without a guest: the freeze/thaw protocol of quiesce.py over
a scripted guest agent (every way out thaws; the deadline thaws during the
body and fails the create; a hung freeze is thawed), the guest agent's wire
protocol (drivers/qga.py) against a socket that replays what QEMU 7.2's
qemu-ga said (a stale reply, the 0xFF resync), the xl.cfg channel and its
QEMU argv, the Xen refusal, and the snapshot labels' rules. The same on real
guests: tests/integration/test_quiesce.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import quiesce
from domsnap.agent.domain import Domain, DomainConfig, RunState
from domsnap.agent.drivers import qemu_argv
from domsnap.agent.drivers.qga import GuestAgent
from domsnap.agent.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from domsnap.agent.limits import check_request
from domsnap.agent.names import check_labels
from domsnap.agent.quiesce import QuiesceRequest
from domsnap.v1 import domsnap_pb2 as pb
from tests.unit.test_xen_driver import driver as xen_driver
from tests.unit.xen_fakes import FakeRunner


class ScriptedAgent(GuestAgent):
    """A guest agent whose answers the test decides; records what was asked, in order."""

    def __init__(self, *, answers: bool = True, freeze_takes: float = 0.0) -> None:
        super().__init__(Path("/nonexistent/qga.sock"), "web")
        self.answers = answers
        self.freeze_takes = freeze_takes
        self.log: list[str] = []

    async def sync(self, timeout: float) -> None:
        if not self.answers:
            raise Unavailable("domain web: no QEMU guest agent answered")
        self.log.append("sync")

    async def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
        self.log.append(command)
        if command == "guest-fsfreeze-freeze":
            async with asyncio.timeout(timeout):
                await asyncio.sleep(self.freeze_takes)
        return 1

    async def close(self) -> None:
        self.log.append("close")


def steps() -> tuple[list[str], Callable[[str], Awaitable[None]]]:
    taken: list[str] = []

    async def step(name: str) -> None:
        taken.append(name)

    return taken, step


def test_a_freeze_is_journaled_before_it_is_asked_and_thawed_after() -> None:
    agent = ScriptedAgent()
    taken, step = steps()

    async def main() -> quiesce.Freeze:
        async with quiesce.frozen(agent, QuiesceRequest(True), step) as freeze:
            assert agent.log == ["sync", "guest-fsfreeze-freeze"] and taken == ["freeze"]
            assert freeze.frozen
        return freeze

    freeze = asyncio.run(main())
    assert agent.log == ["sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "close"]
    assert taken == ["freeze", "thawed"]
    assert freeze.frozen_at <= freeze.thawed_at


@pytest.mark.parametrize("error", [Cancelled("cancelled"), FailedPrecondition("a disk failed"),
                                   asyncio.CancelledError()])
def test_every_way_out_thaws(error: BaseException) -> None:
    agent = ScriptedAgent()
    taken, step = steps()

    async def main() -> None:
        async with quiesce.frozen(agent, QuiesceRequest(True), step):
            raise error

    with pytest.raises(type(error)):
        asyncio.run(main())
    assert agent.log[-2:] == ["guest-fsfreeze-thaw", "close"] and taken == ["freeze", "thawed"]


def test_a_freeze_past_its_deadline_is_thawed_then_and_fails() -> None:
    agent = ScriptedAgent()
    taken, step = steps()
    seen: list[str] = []

    async def main() -> None:
        async with quiesce.frozen(agent, QuiesceRequest(True, deadline=0.05), step):
            await asyncio.sleep(0.3)
            # Thawed at the deadline, while the body (the checkpoint) still ran.
            seen.extend(agent.log)

    with pytest.raises(DeadlineExceeded, match=r"stayed frozen longer than 0\.05 s"):
        asyncio.run(main())
    assert seen == ["sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert taken == ["freeze", "thawed"]


def test_a_hung_freeze_is_thawed_and_fails() -> None:
    agent = ScriptedAgent(freeze_takes=10)
    taken, step = steps()
    body: list[str] = []

    async def main() -> None:
        async with quiesce.frozen(agent, QuiesceRequest(True, deadline=0.05), step):
            body.append("ran")

    with pytest.raises(DeadlineExceeded, match=r"did not freeze its filesystems within 0\.05 s"):
        asyncio.run(main())
    assert body == [] and agent.log[-2:] == ["guest-fsfreeze-thaw", "close"] and taken == ["freeze", "thawed"]


def test_no_answer_is_refused_unless_best_effort() -> None:
    _, step = steps()

    async def main(req: QuiesceRequest) -> quiesce.Freeze:
        async with quiesce.frozen(ScriptedAgent(answers=False), req, step) as freeze:
            return freeze

    with pytest.raises(FailedPrecondition, match="--quiesce-best-effort"):
        asyncio.run(main(QuiesceRequest(True)))
    freeze = asyncio.run(main(QuiesceRequest(True, best_effort=True)))
    assert not freeze.frozen and "no QEMU guest agent answered" in freeze.skipped


def test_what_cannot_be_frozen_is_refused_before_anything_runs(tmp_path: Path) -> None:
    xen = xen_driver(tmp_path, FakeRunner([]))
    config = DomainConfig.parse('name = "web"\nmemory = 128\nkernel = "/k"\n')
    running, paused = Domain(1, config, RunState.RUNNING), Domain(1, config, RunState.PAUSED)
    with pytest.raises(FailedPrecondition, match="xl gives a domain none"):
        quiesce.check(xen, running, QuiesceRequest(True))
    with pytest.raises(FailedPrecondition, match="paused: its guest agent runs only while it does"):
        quiesce.check(xen, paused, QuiesceRequest(True))
    assert quiesce.check(xen, running, QuiesceRequest(True, best_effort=True)) is None
    assert quiesce.check(xen, running, QuiesceRequest()) is None


@pytest.mark.parametrize(("fields", "message"), [
    ((False, True, 0.0), "need quiesce"),
    ((False, False, 5.0), "need quiesce"),
    ((True, False, 601.0), "at most 600"),
    ((True, False, float("nan")), "at most 600"),
])
def test_quiesce_fields_are_checked(fields: tuple[bool, bool, float], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        QuiesceRequest.of(*fields)
    assert QuiesceRequest.of(True, False, 0.0).deadline == quiesce.DEFAULT_DEADLINE


# ------------------------------------------------------------- the wire

def test_the_session_resyncs_past_stale_bytes_and_skips_a_late_reply(tmp_path: Path) -> None:
    """What qemu-ga 7.2 answered on a real guest: an error for the 0xFF it
    cannot parse, then 0xFF and the sync's return; a reply given up on
    (a freeze past its timeout) comes before the next command's."""
    sock = tmp_path / "qga.sock"
    heard: list[dict[str, Any]] = []

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": 99}\n')  # a dead client's reply, still in the channel
        first = await reader.readline()
        assert first.startswith(b"\xff")
        sync = json.loads(first[1:])
        writer.write(b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n')
        writer.write(b"\xff" + json.dumps({"return": sync["arguments"]["id"]}).encode() + b"\n")
        freeze = json.loads(await reader.readline())
        heard.append(freeze)
        thaw = json.loads(await reader.readline())
        heard.append(thaw)
        # The freeze answers late, then the thaw.
        writer.write(b'{"return": 1}\n{"return": 2}\n')
        await writer.drain()
        await reader.read()

    async def main() -> int:
        server = await asyncio.start_unix_server(guest, path=str(sock))
        agent = GuestAgent(sock, "web")
        try:
            await agent.sync(5)
            with pytest.raises(TimeoutError):
                await agent.execute("guest-fsfreeze-freeze", timeout=0.05)
            thawed: int = await agent.execute("guest-fsfreeze-thaw", timeout=5)
            return thawed
        finally:
            await agent.close()
            server.close()

    assert asyncio.run(main()) == 2
    assert [m["execute"] for m in heard] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_no_guest_agent_on_the_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="is qemu-guest-agent running in the guest"):
        asyncio.run(GuestAgent(tmp_path / "none.sock", "web").sync(0.5))


# ------------------------------------------------------- config and argv

CFG = 'name = "web"\nmemory = 128\nkernel = "/k"\n'
PATHS = qemu_argv.LaunchPaths(Path("/s/web/qmp.sock"), Path("/s/web/qemu.pid"), Path("/s/console/web.log"),
                              guest_agent=Path("/s/web/qga.sock"))


def test_the_guest_agent_channel_is_a_virtio_serial_port() -> None:
    config = DomainConfig.parse(CFG + 'channel = [ "name=org.qemu.guest_agent.0, connection=socket" ]\n')
    argv = qemu_argv.launch(config, binary="qemu-system-x86_64", machine="pc-i440fx-7.2", accel="tcg", paths=PATHS)
    i = argv.index("-chardev", argv.index("chardev:serial0"))
    assert argv[i:i + 6] == [
        "-chardev", "socket,id=qga0,path=/s/web/qga.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=qga0-bus",
        "-device", "virtserialport,bus=qga0-bus.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    plain = qemu_argv.launch(DomainConfig.parse(CFG), binary="qemu-system-x86_64", machine="pc-i440fx-7.2",
                             accel="tcg", paths=PATHS)
    assert not any("qga" in word for word in plain)


@pytest.mark.parametrize(("channel", "message"), [
    ('"name=org.example.other"', "makes one channel, name=org.qemu.guest_agent.0"),
    ('"name=org.qemu.guest_agent.0, path=/tmp/x"', "takes name= and connection=socket only"),
    ('"name=org.qemu.guest_agent.0, connection=pty"', "takes name= and connection=socket only"),
    ('"name=org.qemu.guest_agent.0", "name=org.qemu.guest_agent.0"', "given 2 times"),
])
def test_other_channels_are_refused(channel: str, message: str) -> None:
    config = DomainConfig.parse(CFG + f"channel = [ {channel} ]\n")
    with pytest.raises(InvalidArgument, match=message):
        qemu_argv.launch(config, binary="qemu-system-x86_64", machine="pc-i440fx-7.2", accel="tcg", paths=PATHS)


# ----------------------------------------------------------------- labels

def test_labels_are_checked() -> None:
    assert check_labels({"domsnap.dev/schedule": "hourly", "team": ""}) == {"domsnap.dev/schedule": "hourly",
                                                                          "team": ""}
    for bad in ({"": "x"}, {"a b": "x"}, {"k": "a/b"}, {"k" * 64: "x"}, {f"k{i}": "" for i in range(17)}):
        with pytest.raises(InvalidArgument):
            check_labels(bad)
    # The request size check reads a map's keys and values.
    with pytest.raises(InvalidArgument, match="labels"):
        check_request(pb.CreateSnapshotRequest(labels={"k": "x\0"}))
