"""Guest quiesce on real guests: the test guest, booted from guest/build.sh's
initrd-qga.img, runs Debian's qemu-ga on its guest-agent channel, with an
ext4 at /data to freeze; its freeze hook prints
`FSFREEZE freeze|thaw` on the console (guest/fsfreeze-hook). The freeze is
seen, happened at the instant, and is thawed on success, on a deadline, on a
hang and after the agent is killed while the guest is frozen."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from domsnap.agent.drivers.qga import GuestAgent
from domsnap.agent.journal import KILL_ENV
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk
from tests.integration.conftest import Guest, destroy_all, error_info, own_agent

pytestmark = [pytest.mark.guest]

CHANNEL = 'channel = [ "name=org.qemu.guest_agent.0" ]\n'
# Beside initrd.img: the same initramfs with the guest agent appended.
QGA_RAMDISK = "initrd-qga.img"


@pytest.fixture(scope="module")
def qagent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    with own_agent(tmp_path_factory.mktemp("quiesce"), accel, tables="[testing]\nfault_injection = true\n") as a:
        yield a


@pytest.fixture
def guests(qagent: Agent) -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    destroy_all(qagent, made)


def boot(agent: Agent, image: tuple[Path, Path], folder: Path, made: list[Guest], *, extra: str = "",
         channel: bool = True) -> Guest:
    name = f"q{uuid.uuid4().hex[:8]}"
    disk = folder / f"{name}.qcow2"
    make_disk(disk, "qcow2")
    serial = folder / f"{name}.log"
    cfg = folder / f"{name}.cfg"
    kernel, ramdisk = image
    if channel:
        ramdisk = ramdisk.with_name(QGA_RAMDISK)
    cfg.write_text(guest_config(name, kernel, ramdisk, {"xvda": (disk, "qcow2")}, serial, extra=extra)
                   + (CHANNEL if channel else ""))
    agent.cli("create", str(cfg), check=True)
    g = Guest(agent, name, folder, {"xvda": (disk, "qcow2")}, serial)
    made.append(g)
    guestprobe.wait_ready(serial, timeout=60)
    if channel and "domsnap.qga=0" not in extra:
        assert "QGA" in g.lines_since(0), "the guest agent did not start"
    return g


def fsfreeze(g: Guest, since: int) -> list[str]:
    return [line.split()[1] for line in g.lines_since(since) if line.startswith("FSFREEZE ")]


def freeze_status(agent: Agent, g: Guest) -> str:
    async def ask() -> str:
        qga = GuestAgent(agent.state_dir / "qemu" / g.name / "qga.sock", g.name)
        try:
            await qga.sync(10)
            return str(await qga.execute("guest-fsfreeze-status", timeout=10))
        finally:
            await qga.close()

    return asyncio.run(ask())


def create_error(g: Guest, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        g.create_snapshot(**fields)
    return info.value


def test_quiesced_snapshot_is_frozen_at_its_instant(qagent: Agent, guest_image: tuple[Path, Path], tmp_path: Path,
                                                     guests: list[Guest]) -> None:
    g = boot(qagent, guest_image, tmp_path, guests)
    for live in (False, True):
        mark = g.mark()
        events = g.create_snapshot(name=f"q{int(live)}", live=live, quiesce=True)
        assert events[-1].finished.result.quiesced
        # The guest froze, then thawed; the agent's session is over and the guest runs thawed.
        assert fsfreeze(g, mark) == ["freeze", "thaw"]
        assert freeze_status(qagent, g) == "thawed"
        assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    # The memory image holds a guest whose filesystems were frozen: reverted
    # running, the guest agent thaws one filesystem (it counts only those
    # that were frozen, so 0 had the instant been outside the freeze).
    events = g.revert("q0")
    assert any("1 were frozen at the instant" in ev.progress.message for ev in events)
    assert freeze_status(qagent, g) == "thawed"
    unquiesced = g.create_snapshot(name="plain")
    assert not unquiesced[-1].finished.result.quiesced


def test_no_guest_agent_is_refused_unless_best_effort(qagent: Agent, guest_image: tuple[Path, Path],
                                                      tmp_path: Path, guests: list[Guest]) -> None:
    bare = boot(qagent, guest_image, tmp_path, guests, channel=False)
    err = create_error(bare, name="x", quiesce=True)
    assert error_info(err) == ("FAILED_PRECONDITION", "QUIESCE_UNSUPPORTED", {"domain": bare.name})
    assert "no guest agent channel" in str(err.details())
    silent = boot(qagent, guest_image, tmp_path, guests, extra="domsnap.qga=0")
    err = create_error(silent, name="x", quiesce=True)
    assert error_info(err) == ("FAILED_PRECONDITION", "GUEST_AGENT_UNAVAILABLE", {"domain": silent.name})
    assert "no QEMU guest agent answered" in str(err.details()) and "--quiesce-best-effort" in str(err.details())
    assert not (qagent.snapshot_root / silent.name / "x").exists()
    for g in (bare, silent):
        events = g.create_snapshot(name="x", quiesce=True, quiesce_best_effort=True)
        assert not events[-1].finished.result.quiesced
    bare.agent.stub().PauseDomain(pb.PauseDomainRequest(domain_name=bare.name), timeout=30)
    err = create_error(bare, name="y", quiesce=True)
    assert error_info(err) == ("FAILED_PRECONDITION", "DOMAIN_NOT_RUNNING", {"domain": bare.name})


def test_hung_freeze_is_thawed_and_fails_and_a_cancel_thaws(qagent: Agent, guest_image: tuple[Path, Path],
                                                            tmp_path: Path, guests: list[Guest]) -> None:
    """The freeze hook sleeps 6 s: past the 2 s deadline the thaw is sent (it
    waits behind the freeze), the create fails, and returns only thawed. A
    create cancelled while the guest freezes stops at its next step, thawed."""
    g = boot(qagent, guest_image, tmp_path, guests, extra="domsnap.freeze_hang=6")
    mark = g.mark()
    err = create_error(g, name="hung", quiesce=True, freeze_timeout=Duration(seconds=2))
    assert error_info(err) == ("DEADLINE_EXCEEDED", "FREEZE_TIMEOUT", {"domain": g.name})
    assert "did not freeze its filesystems within 2 s" in str(err.details())
    assert fsfreeze(g, mark) == ["freeze", "thaw"]
    assert freeze_status(qagent, g) == "thawed"
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    assert not (qagent.snapshot_root / g.name / "hung").exists()

    mark = g.mark()
    stub = qagent.stub()
    stream = stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=g.name, name="cut", quiesce=True,
                                                          request_id=uuid.uuid4().hex), timeout=300)
    first = next(stream)
    # The freeze hook runs (and sleeps): the cancel comes while the guest freezes.
    guestprobe.wait_for(g.serial, lambda lines: "FSFREEZE freeze" in " ".join(lines) or None, timeout=30,
                        offset=mark, what="the freeze hook")
    stub.CancelOperation(pb.CancelOperationRequest(operation_id=first.started.id), timeout=30)
    with pytest.raises(grpc.RpcError) as cancelled:
        list(stream)
    assert error_info(cancelled.value) == ("CANCELLED", "OPERATION_CANCELLED", {"operation_id": first.started.id})
    assert fsfreeze(g, mark) == ["freeze", "thaw"]
    assert freeze_status(qagent, g) == "thawed"
    assert not (qagent.snapshot_root / g.name / "cut").exists()


def test_agent_killed_while_frozen_thaws_on_restart(qagent: Agent, guest_image: tuple[Path, Path], tmp_path: Path,
                                                    guests: list[Guest]) -> None:
    g = boot(qagent, guest_image, tmp_path, guests)
    mark = g.mark()
    # Killed right after journaling the checkpoint: the guest is frozen by then.
    qagent.env[KILL_ENV] = "create:checkpoint"
    qagent.restart()
    try:
        with pytest.raises(grpc.RpcError):
            g.create_snapshot(name="killed", quiesce=True)
        assert qagent.proc is not None and qagent.proc.wait(timeout=60) == -9
        assert fsfreeze(g, mark) == ["freeze"]
    finally:
        qagent.proc = None
        del qagent.env[KILL_ENV]
        qagent.start()
    assert fsfreeze(g, mark) == ["freeze", "thaw"]
    assert freeze_status(qagent, g) == "thawed"
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    assert not (qagent.snapshot_root / g.name / "killed").exists()
