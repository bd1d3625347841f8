"""Group snapshots across two real agents, each with a real guest: one instant
(the pause intervals overlap, from the members' manifests), non-live and
live; a group revert brings both guests back to it; a coordinator killed (or
hung) between freeze and commit leaves both guests running within the lease
and nothing on disk; a member that fails rolls every member back.

The two agents and their guests are shared by the module's tests (about a
minute in all, unloaded); each test leaves both guests running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from domsnap.client import group
from domsnap.v1 import domsnap_pb2 as pb
from tests.integration.conftest import Agent, Guest, destroy_all, own_agent, start_guest
from tests.integration.test_snapshots import Taken, revert_and_check, wait_tick

RUNNING = pb.DOMAIN_STATE_RUNNING
# Short, so that the hung-coordinator case costs little.
LEASE = 4.0


@dataclass
class Pair:
    agents: tuple[Agent, Agent]
    guests: tuple[Guest, Guest]

    @property
    def members(self) -> tuple[group.Member, ...]:
        return tuple(group.Member(g.name, g.agent.address) for g in self.guests)

    @property
    def member_args(self) -> list[str]:
        return [str(m) for m in self.members]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, accel: str, guest_image: tuple[Path, Path]) -> Iterator[Pair]:
    # Pre-copy, whatever the accelerator: the live cases here exercise its
    # hold (drivers/pipe_relay.py); test_live_mode has the background
    # snapshots that live_mode auto takes under TCG. No live snapshot is
    # reverted here, so TCG's lost pre-copy writes do not matter.
    precopy = 'live_mode = "precopy"\n'
    with own_agent(tmp_path_factory.mktemp("ga"), accel, qemu=precopy) as a, \
            own_agent(tmp_path_factory.mktemp("gb"), accel, qemu=precopy) as b:
        folder = tmp_path_factory.mktemp("group-guests")
        guests = (start_guest(a, guest_image, folder, "qcow2"), start_guest(b, guest_image, folder, "qcow2"))
        yield Pair((a, b), guests)
        destroy_all(a, [guests[0]])
        destroy_all(b, [guests[1]])


def _both_running(pair: Pair) -> None:
    for g in pair.guests:
        d = g.domain()
        assert (d.state, d.busy_with_operation) == (RUNNING, ""), (g.name, d)


def _check_instant(snaps: dict[group.Member, pb.Snapshot], name: str, pair: Pair) -> None:
    """Every member names the group, and the members' pause intervals overlap."""
    ids = {s.group.id for s in snaps.values()}
    assert len(ids) == 1 and "" not in ids
    for m, s in snaps.items():
        assert (s.name, s.domain, s.group.name) == (name, m.domain, name)
        assert list(s.group.members) == pair.member_args
        manifest = json.loads((Path(s.path) / "snapshot.json").read_text())
        assert manifest["group"] == {"id": s.group.id, "name": name, "members": pair.member_args}
        assert 0 < manifest["paused_at"] < manifest["resumed_at"], manifest
    paused = [json.loads((Path(s.path) / "snapshot.json").read_text())["paused_at"] for s in snaps.values()]
    resumed = [json.loads((Path(s.path) / "snapshot.json").read_text())["resumed_at"] for s in snaps.values()]
    assert max(paused) < min(resumed), f"pause intervals do not overlap: paused {paused}, resumed {resumed}"


def _create(pair: Pair, name: str, *, live: bool) -> tuple[dict[group.Member, pb.Snapshot], list[str]]:
    seen: list[str] = []
    snaps = group.create(name, pair.members, live=live,
                         on_progress=lambda m, word, p: seen.append(f"{m.domain}:{word}"))
    return snaps, seen


@pytest.mark.parametrize("live", [False, True], ids=["non-live", "live"])
def test_group_create_is_one_instant(pair: Pair, live: bool) -> None:
    name = f"g-{'live' if live else 'stop'}-{uuid.uuid4().hex[:4]}"
    snaps, seen = _create(pair, name, live=live)
    assert set(snaps) == set(pair.members)
    for g in pair.guests:
        assert f"{g.name}:prepared" in seen and f"{g.name}:frozen" in seen, seen
        assert seen.index(f"{g.name}:prepared") < seen.index(f"{g.name}:frozen")
    _check_instant(snaps, name, pair)
    assert all(s.live == live for s in snaps.values())
    _both_running(pair)
    listed = {x.name: x for x in group.list_groups(pair.members)}
    assert listed[name].complete and set(listed[name].found) == set(pair.members)


def test_group_revert_brings_both_back_to_the_instant(pair: Pair) -> None:
    name = f"g-rev-{uuid.uuid4().hex[:4]}"
    for g in pair.guests:
        wait_tick(g)
    before = {g.name: g.counter() for g in pair.guests}
    snaps, _ = _create(pair, name, live=False)
    after = {g.name: g.counter() for g in pair.guests}
    by_domain = {m.domain: s for m, s in snaps.items()}
    taken = {g.name: Taken(by_domain[g.name], before[g.name], after[g.name]) for g in pair.guests}
    time.sleep(1.5)
    # One revert of the group; each guest's self-check proves RAM and disk
    # came back from the instant (revert_and_check runs the revert once, via the first guest).
    first, second = pair.guests

    def revert_group() -> None:
        reverted = group.revert(name, pair.members)
        assert {m.domain for m in reverted} == {first.name, second.name}

    revert_and_check(first, taken[first.name], do=revert_group)
    # The whole log: this is the module's only revert, so its last restart is
    # this one. (A byte mark taken before the revert missed the restart in
    # some runs although the log held it; not yet understood.)
    counters = _counters_since(second, 0)
    assert counters, "the second guest printed nothing after the revert"
    assert taken[second.name].c_before + 1 <= min(counters) <= taken[second.name].c_after + 1, counters
    _both_running(pair)


def _counters_since(g: Guest, offset: int, timeout: float = 20.0) -> list[int]:
    from testbed import guestprobe

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = guestprobe.serial_counters(g.serial, offset)
        # The old guest's last lines come before the restored one's: the restored run starts lower.
        restarts = [i for i in range(1, len(found)) if found[i] < found[i - 1]]
        if restarts and len(found) - restarts[-1] >= 3:
            return found[restarts[-1]:]
        time.sleep(0.2)
    return []


# A coordinator in its own process: it asks for a group snapshot and, as soon
# as every member answered FROZEN (before it sends COMMIT), kills or stops itself.
_COORDINATOR = """
import os, signal, sys
from domsnap.client import group
name, how, lease, live, request_id, *members = sys.argv[1:]
members = group.parse_members(members)
frozen = set()
def on_progress(member, word, p):
    if word == "frozen":
        frozen.add(member)
        if len(frozen) == len(members):
            print("FROZEN", flush=True)
            os.kill(os.getpid(), getattr(signal, how))
group.create(name, members, lease=float(lease), live=live == "live", on_progress=on_progress, request_id=request_id)
print("COMMITTED", flush=True)
"""


# Live: each member's save is cancelled in the pause, its image's relay (pipe_relay) ended with it.
@pytest.mark.parametrize(("how", "live"), [("SIGKILL", False), ("SIGSTOP", False), ("SIGKILL", True)],
                         ids=["killed", "hung", "killed-live"])
def test_coordinator_gone_between_freeze_and_commit(pair: Pair, how: str, live: bool) -> None:
    name = f"g-{how.lower()}-{uuid.uuid4().hex[:4]}"
    request_id = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", _COORDINATOR, name, how, str(LEASE),
                             "live" if live else "stop", request_id, *pair.member_args], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "FROZEN"
        frozen_at = time.monotonic()
        # Killed: its calls end at once. Stopped: its calls stay open, and the lease ends them.
        deadline = frozen_at + LEASE + 5
        while time.monotonic() < deadline:
            states = [(g.domain().state, g.domain().busy_with_operation) for g in pair.guests]
            if states == [(RUNNING, "")] * 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the guests are not running and idle within the lease: {states}")
        if how == "SIGSTOP":
            assert time.monotonic() - frozen_at >= LEASE - 1, "the members gave up before the lease ended"
    finally:
        proc.kill()
        proc.wait()
    for g in pair.guests:
        agent = g.agent
        assert not (agent.snapshot_root / g.name / name).exists(), "a member left its snapshot's directory"
        assert name not in [s.name for s in agent.stub().ListSnapshots(
            pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        image = g.disks["xvda"][0]
        tags = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(image)], capture_output=True, text=True,
                              check=True).stdout
        assert name not in tags, tags
        assert g.domain().disks[0].target == str(image), "the guest should still write its own image"
    ops = pair.agents[0].stub().ListOperations(pb.ListOperationsRequest(domain_name=pair.guests[0].name), timeout=30)
    mine = [op for op in ops.operations if op.snapshot == name]
    assert mine and mine[0].state == pb.OPERATION_STATE_CANCELLED, mine
    assert ("lease" in mine[0].error.message) == (how == "SIGSTOP"), mine[0].error.message
    # Retried with its request id, the group gets its first answer: rolled back, and nothing is made now.
    with pytest.raises(group.GroupError) as again:
        group.create(name, pair.members, lease=LEASE, live=live, request_id=request_id)
    assert again.value.code == grpc.StatusCode.CANCELLED, again.value.message
    for g in pair.guests:
        assert not (g.agent.snapshot_root / g.name / name).exists()
    ops = pair.agents[0].stub().ListOperations(pb.ListOperationsRequest(domain_name=pair.guests[0].name), timeout=30)
    assert [op.id for op in ops.operations if op.snapshot == name] == [mine[0].id], "the retry ran again"
    _both_running(pair)


def test_a_failing_member_rolls_every_member_back(pair: Pair) -> None:
    name = f"g-fail-{uuid.uuid4().hex[:4]}"
    good = pair.members[0]
    missing = group.Member("no-such-domain", pair.agents[1].address)
    with pytest.raises(group.GroupError) as caught:
        group.create(name, [good, missing])
    assert list(caught.value.failures) == [str(missing)], caught.value.failures
    assert "no-such-domain" in caught.value.message
    assert not (pair.agents[0].snapshot_root / good.domain / name).exists()
    _both_running(pair)


def test_cli_group_verbs(pair: Pair) -> None:
    name = f"g-cli-{uuid.uuid4().hex[:4]}"
    cli = pair.agents[0].cli
    made = cli("group-snapshot-create", name, *pair.member_args, "--live", check=True)
    for m in pair.member_args:
        assert m in made.stdout, made.stdout
    listed = cli("--json", "group-snapshot-list", *pair.member_args, check=True)
    groups = {g["name"]: g for g in json.loads(listed.stdout)["groups"]}
    assert groups[name]["complete"] is True and sorted(groups[name]["found"]) == sorted(pair.member_args)
    bad = cli("group-snapshot-create", name, "nodomain")
    assert bad.returncode == 2 and "DOMAIN@ADDR" in bad.stderr
    cli("group-snapshot-delete", name, *pair.member_args, check=True)
    for g in pair.guests:
        assert not (g.agent.snapshot_root / g.name / name).exists()
    gone = cli("group-snapshot-revert", name, *pair.member_args)
    assert gone.returncode == 1 and "not" in gone.stderr.lower(), gone.stderr
    assert os.path.exists(pair.guests[0].serial)
    _both_running(pair)


def _operations(agent: Agent, domain: str, kind: pb.OperationKind.ValueType) -> list[str]:
    ops = agent.stub().ListOperations(pb.ListOperationsRequest(domain_name=domain, kind=kind), timeout=30)
    return [op.id for op in ops.operations]


def test_a_retried_group_call_gets_its_first_answer_after_a_kill(pair: Pair) -> None:
    """group-snapshot-create and -revert retried with their request ids, the first agent killed (-9) and
    restarted in between (its answers from request_ids.sqlite, the second's from memory): each member
    answers from its first operation; nothing is made or reverted twice (a second create would be
    SNAPSHOT_EXISTS, a second revert would throw away what the guests did since)."""
    name = f"g-retry-{uuid.uuid4().hex[:4]}"
    first_agent = pair.agents[0]

    def after_a_kill() -> None:
        assert first_agent.stop(signal.SIGKILL) == -9
        first_agent.start()

    create_id = uuid.uuid4().hex
    made = group.create(name, pair.members, request_id=create_id)
    after_a_kill()
    again = group.create(name, pair.members, request_id=create_id)
    assert {m: s.uid for m, s in again.items()} == {m: s.uid for m, s in made.items()}
    _check_instant(again, name, pair)
    for g in pair.guests:
        assert [s.name for s in g.agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name),
                                                             timeout=30).snapshots].count(name) == 1

    reverts_before = {g.name: _operations(g.agent, g.name, pb.OPERATION_KIND_REVERT_SNAPSHOT) for g in pair.guests}
    revert_id = uuid.uuid4().hex
    reverted = group.revert(name, pair.members, request_id=revert_id)
    after_a_kill()
    reverted_again = group.revert(name, pair.members, request_id=revert_id)
    assert {m: s.uid for m, s in reverted_again.items()} == {m: s.uid for m, s in reverted.items()}
    for g in pair.guests:
        added = [op for op in _operations(g.agent, g.name, pb.OPERATION_KIND_REVERT_SNAPSHOT)
                 if op not in reverts_before[g.name]]
        assert len(added) == 1, f"{g.name}: {len(added)} reverts for one request id"
    _both_running(pair)
    group.delete(name, pair.members)
