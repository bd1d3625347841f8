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
from collections.abc import Callable

import pytest

from domsnap.agent.errors import Cancelled, FailedPrecondition, InvalidArgument
from domsnap.agent.group_gate import Command, Gate, Group, Phase, lease_of
from domsnap.agent.manifest import Manifest
from domsnap.agent.operations import Operation, OpState
from domsnap.agent.service import AgentService
from tests.unit.test_core_recovery import Host, assert_no_trace, create_request, finished, host, snapshots

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


def test_an_agent_killed_while_its_guest_waits_paused_is_rolled_back_by_the_next(host: Host) -> None:
    before = host.domain()["disks"]

    def die_when_frozen(phase: Phase) -> Command | None:
        if phase is Phase.FROZEN:
            os.kill(os.getpid(), signal.SIGKILL)
        return Command.FREEZE

    pid = os.fork()
    if pid == 0:  # the agent that dies: nothing of pytest's runs in it
        try:
            asyncio.run(member(host.service(), die_when_frozen))
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert host.domain()["state"] == "paused", "the dead agent should have left the guest paused"
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
