"""A group snapshot's member in the core, without a guest: the create held at
its two barriers by a real Gate over the fake hypervisor and the real storage
backends; committed, aborted, left past its lease, told the wrong command,
and killed (a real SIGKILL of a forked agent) while its guest is paused
waiting for COMMIT, then recovered by a fresh agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from domsnap.agent.errors import Cancelled, FailedPrecondition, InvalidArgument
from domsnap.agent.group_gate import Command, Gate, Group, Phase, lease_of
from domsnap.agent.manifest import Manifest
from domsnap.agent.op_history import DAY
from domsnap.agent.operations import Operation, OpState
from domsnap.agent.request_ids import RequestIds
from domsnap.agent.service import AgentService
from domsnap.agent.storage.qcow2 import Qcow2Backend
from domsnap.v1 import domsnap_pb2 as pb
from tests.unit.test_core_recovery import DOMAIN, Host, assert_no_trace, create_request, finished, host, snapshots, tags

__all__ = ["host"]

GROUP = Group("id-1", "g1", ("core@unix:/a", "peer@unix:/b"))
# Told each phase the member reaches: the command the coordinator answers with (None: no answer).
Script = Callable[[Phase], Command | None]


async def member(service: AgentService, script: Script, lease: float = 5.0) -> Operation:
    gate: Gate | None = None

    def reached(phase: Phase, _at: float) -> None:
        command = script(phase)
        if command is not None:
            assert gate is not None
            # As the servicer's command reader would: from the loop, after this returns.
            asyncio.get_running_loop().call_soon(gate.tell, command)

    gate = service.group_gate(GROUP, lease, reached)
    return await finished(await service.create_snapshot(create_request(GROUP.name), "", gate))


def commits(phase: Phase) -> Command:
    return Command.FREEZE if phase is Phase.PREPARED else Command.COMMIT


def test_a_committed_member_is_a_snapshot_that_names_its_group(host: Host) -> None:
    service = host.service()
    op = asyncio.run(member(service, commits))
    assert op.state is OpState.SUCCEEDED, op.error
    manifest = json.loads((host.snapdir(GROUP.name) / "snapshot.json").read_text())
    assert manifest["group"] == {"id": "id-1", "name": "g1", "members": ["core@unix:/a", "peer@unix:/b"]}
    (listed,) = snapshots(host.service())
    assert (listed.group.id, listed.group.name, list(listed.group.members)) == ("id-1", "g1", list(GROUP.members))
    assert host.domain()["state"] == "running"


@pytest.mark.parametrize("at", [Phase.PREPARED, Phase.FROZEN])
def test_an_aborted_member_rolls_back_and_runs_on(host: Host, at: Phase) -> None:
    before = host.domain()["disks"]
    op = asyncio.run(member(host.service(), lambda p: Command.ABORT if p is at else commits(p)))
    assert op.state is OpState.CANCELLED and isinstance(op.error, Cancelled), op.error
    assert_no_trace(host, GROUP.name, before)
    assert host.domain()["state"] == "running"
    assert not host.journal()


def test_a_frozen_member_takes_its_state_before_commit_and_resumes_only_after(host: Host) -> None:
    """FROZEN is told as the guest pauses; the member's disks are taken while the coordinator gathers the
    other members (here: until this member's tag exists), and its guest stays paused until COMMIT."""
    service = host.service()
    seen: list[str] = []

    async def coordinator(gate: Gate) -> None:
        deadline = time.monotonic() + 3.0  # within the lease: a member that waits for COMMIT first never gets it
        while not (tagged := GROUP.name in await asyncio.to_thread(tags, host.disk("xvda"))) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        seen.append(f"{(await service.driver.lookup(DOMAIN)).state}, tagged: {tagged}")
        gate.tell(Command.COMMIT)

    async def run() -> Operation:
        gate: Gate | None = None

        def reached(phase: Phase, _at: float) -> None:
            assert gate is not None
            if phase is Phase.PREPARED:
                asyncio.get_running_loop().call_soon(gate.tell, Command.FREEZE)
            else:
                waiting.append(asyncio.ensure_future(coordinator(gate)))

        waiting: list[asyncio.Future[None]] = []
        gate = service.group_gate(GROUP, 5.0, reached)
        op = await finished(await service.create_snapshot(create_request(GROUP.name), "", gate))
        await asyncio.gather(*waiting)
        return op

    op = asyncio.run(run())
    assert op.state is OpState.SUCCEEDED, op.error
    assert seen == ["paused, tagged: True"]
    assert host.domain()["state"] == "running"


def test_the_wait_for_commit_ends_a_lease_after_frozen(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease runs from FROZEN, not from when the member's state is taken: the guest's pause is bounded
    by it, however long the state took."""
    service = host.service()
    lease = 1.0
    real_take = Qcow2Backend.take

    async def slow_take(self: Qcow2Backend, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(lease * 0.8)
        await real_take(self, *args, **kwargs)

    async def run() -> tuple[Operation, float]:
        gate: Gate | None = None
        frozen_at = 0.0

        def reached(phase: Phase, _at: float) -> None:
            nonlocal frozen_at
            assert gate is not None
            if phase is Phase.PREPARED:
                asyncio.get_running_loop().call_soon(gate.tell, Command.FREEZE)
            else:
                frozen_at = time.monotonic()

        gate = service.group_gate(GROUP, lease, reached)
        op = await finished(await service.create_snapshot(create_request(GROUP.name), "", gate))
        return op, time.monotonic() - frozen_at

    monkeypatch.setattr(Qcow2Backend, "take", slow_take)
    op, waited = asyncio.run(run())
    assert op.state is OpState.CANCELLED and op.error is not None and "lease" in op.error.message, op.error
    # Counted from the end of the 0.8 s take, it would end at 1.8 s.
    assert waited < lease + 0.5, f"the member gave up {waited:.2f} s after FROZEN"
    assert host.domain()["state"] == "running"


def test_no_command_within_the_lease_rolls_back(host: Host) -> None:
    before = host.domain()["disks"]
    op = asyncio.run(member(host.service(), lambda p: Command.FREEZE if p is Phase.PREPARED else None, lease=0.2))
    assert op.state is OpState.CANCELLED and op.error is not None and "0.2 s lease" in op.error.message, op.error
    assert_no_trace(host, GROUP.name, before)
    assert host.domain()["state"] == "running"


def test_a_command_out_of_turn_rolls_back(host: Host) -> None:
    before = host.domain()["disks"]
    op = asyncio.run(member(host.service(), lambda p: Command.COMMIT))
    assert op.state is OpState.FAILED and isinstance(op.error, FailedPrecondition), op.error
    assert "sends freeze next" in op.error.message
    assert_no_trace(host, GROUP.name, before)


@pytest.mark.parametrize("where", ["frozen", "state taken"])
def test_an_agent_killed_while_its_guest_waits_paused_is_rolled_back_by_the_next(
        host: Host, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Killed as it tells FROZEN, or once its state is taken and it waits for COMMIT: the next agent
    resumes the guest and undoes the disks taken."""
    before = host.domain()["disks"]

    async def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def die_when_frozen(phase: Phase) -> Command | None:
        if phase is Phase.FROZEN and where == "frozen":
            os.kill(os.getpid(), signal.SIGKILL)
        return Command.FREEZE

    if where == "state taken":
        monkeypatch.setattr(Gate, "committed", lambda self: die())
    pid = os.fork()
    if pid == 0:  # the agent that dies: nothing of pytest's runs in it
        try:
            asyncio.run(member(host.service(), die_when_frozen))
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert host.domain()["state"] == "paused", "the dead agent should have left the guest paused"
    assert (GROUP.name in tags(host.disk("xvda"))) == (where == "state taken")
    assert asyncio.run(host.service().recover()) == 1
    assert host.domain()["state"] == "running"
    assert_no_trace(host, GROUP.name, before)


def test_the_lease_is_the_coordinators_within_the_agents_bound() -> None:
    assert lease_of(0, 60) == 10
    assert lease_of(0, 5) == 5
    assert lease_of(30, 60) == 30
    for bad in (-1, 61):
        with pytest.raises(InvalidArgument, match="group_lease_max_seconds"):
            lease_of(bad, 60)


def test_a_manifest_with_a_malformed_group_is_refused(host: Host) -> None:
    asyncio.run(member(host.service(), commits))
    data = json.loads((host.snapdir(GROUP.name) / "snapshot.json").read_text())
    data["group"] = {"id": "x", "name": "g1", "members": "not a list"}
    with pytest.raises(FailedPrecondition, match="group"):
        Manifest.from_json(json.dumps(data), "snapshot.json")


def test_a_prepare_is_known_by_its_creates_request_id(host: Host) -> None:
    """A retried PREPARE gets the first member operation, also from a restarted agent's request_ids.sqlite;
    the same id with another group is refused."""
    service = host.service()
    group = pb.SnapshotGroup(id="id-1", name="g1", members=list(GROUP.members))
    prepare = pb.GroupSnapshotRequest(command=pb.GROUP_COMMAND_PREPARE, group=group, create=pb.CreateSnapshotRequest(
        request_id="m-1", domain_name=DOMAIN, name="g1"))
    calls: list[str] = []

    async def start() -> Operation:
        calls.append("start")
        return await member(service, commits)

    def once(ids: RequestIds, request: pb.GroupSnapshotRequest) -> Operation:
        return asyncio.run(ids.once_operation("uid=0", "GroupSnapshot", request, start, service.operation))

    first = once(RequestIds(host.state_dir, keep=DAY), prepare)
    again = once(RequestIds(host.state_dir, keep=DAY), prepare)
    assert (again.id, again.state, calls) == (first.id, OpState.SUCCEEDED, ["start"])
    other = pb.GroupSnapshotRequest()
    other.CopyFrom(prepare)
    other.group.members.append("third@unix:/c")
    with pytest.raises(InvalidArgument, match=r"GroupSnapshot\(domain_name='core' name='g1'\)"):
        once(RequestIds(host.state_dir, keep=DAY), other)
