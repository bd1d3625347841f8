"""snapshot-prune's choice: only snapshots a schedule marked (of that
schedule, with --schedule; names beginning with --prefix), all but the
newest N, oldest first; never an unmarked one. Against a real agent:
tests/integration/test_schedule.py."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from domsnap.client import cli
from domsnap.client.commands import SCHEDULE_LABEL, prunable
from domsnap.v1 import domsnap_pb2 as pb
from tests.unit import test_cli


def snap(name: str, at: int, schedule: str | None = None) -> pb.Snapshot:
    labels = {SCHEDULE_LABEL: schedule} if schedule is not None else {}
    return pb.Snapshot(name=name, created_at=Timestamp(seconds=at), labels=labels)


SNAPSHOTS = [snap("h3", 30, "hourly"), snap("hand", 5), snap("h1", 10, "hourly"), snap("d1", 15, "daily"),
             snap("h2", 20, "hourly"), snap("x-h4", 40, "hourly"), snap("late-hand", 50)]


def names(snapshots: list[pb.Snapshot]) -> list[str]:
    return [s.name for s in snapshots]


def test_only_marked_snapshots_go_oldest_first() -> None:
    assert names(prunable(SNAPSHOTS, 2)) == ["h1", "d1", "h2"]
    assert names(prunable(SNAPSHOTS, 2, schedule="hourly")) == ["h1", "h2"]
    assert names(prunable(SNAPSHOTS, 0, schedule="daily")) == ["d1"]
    assert names(prunable(SNAPSHOTS, 1, prefix="h")) == ["h1", "h2"]
    assert prunable(SNAPSHOTS, 10) == []
    assert "hand" not in names(prunable(SNAPSHOTS, 0)) and "late-hand" not in names(prunable(SNAPSHOTS, 0))


@pytest.mark.parametrize("args", [["snapshot-prune", "web"], ["snapshot-prune", "web", "--keep", "x"]])
def test_keep_is_required_and_a_number(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == 2
    assert "--keep" in capsys.readouterr().err


# The CLI against test_cli's fake agent.
agent = test_cli.agent


def test_snapshot_create_sends_quiesce_and_labels(agent: test_cli.Agent) -> None:
    assert agent.run("snapshot-create", "web", "--quiesce-best-effort", "--freeze-timeout", "4",
                     "--label", f"{SCHEDULE_LABEL}=hourly", "--label", "team=db") == 0
    request = agent.fake.last("CreateSnapshot")
    assert isinstance(request, pb.CreateSnapshotRequest)
    assert (request.quiesce, request.quiesce_best_effort, request.freeze_timeout.seconds) == (True, True, 4)
    assert dict(request.labels) == {SCHEDULE_LABEL: "hourly", "team": "db"}
    assert agent.run("snapshot-create", "web", "--quiesce") == 0
    request = agent.fake.last("CreateSnapshot")
    assert isinstance(request, pb.CreateSnapshotRequest)
    assert (request.quiesce, request.quiesce_best_effort, request.HasField("freeze_timeout")) == (True, False, False)
    # Usage errors, nothing sent.
    assert agent.run("snapshot-create", "web", "--freeze-timeout", "4") == 2
    assert agent.run("snapshot-create", "web", "--label", "no-value") == 2
