"""Identities and reasons without a guest: default snapshot names unique below
a second (the agent's service over the fake hypervisor, where a create takes
milliseconds), domain uids kept across restarts, every reason the agent
raises listed in domsnap.proto, a risky revert's violations as the client
library and the CLI read them, and an operation's recorded error keeping its
reason across a restart."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from domsnap.agent import convert, snapshot_create
from domsnap.agent.errors import CommandError, RevertRisky, Risk
from domsnap.agent.names import default_snapshot_name, unique_name
from domsnap.agent.op_history import History
from domsnap.agent.operations import Operation, OpKind, OpState
from domsnap.agent.uids import DomainUids
from domsnap.client import errors as client_errors
from tests.unit.test_core_recovery import DOMAIN, Host, create_request, finished, host  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def nameless(host: Host) -> list[str]:  # noqa: F811
    async def run() -> list[str]:
        service = host.service()
        ops = [await finished(await service.create_snapshot(create_request(""), "")) for _ in range(2)]
        return [op.snapshot for op in ops]

    return asyncio.run(run())


def test_two_nameless_creates_within_one_second_both_succeed(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The agent's clock read twice within one second (5 ms and 900 ms past it), as two quick creates do."""
    instants = iter([datetime(2026, 12, 2, 12, 0, 0, 5_000, tzinfo=UTC), datetime(2026, 12, 2, 12, 0, 0, 900_000,
                                                                               tzinfo=UTC)])
    monkeypatch.setattr(snapshot_create, "default_snapshot_name", lambda: default_snapshot_name(next(instants)))
    assert nameless(host) == ["20261202T120000.005Z", "20261202T120000.900Z"]


def test_a_default_name_taken_within_the_same_millisecond_gets_a_suffix(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(snapshot_create, "default_snapshot_name", lambda: "20261202T120000.000Z")
    assert nameless(host) == ["20261202T120000.000Z", "20261202T120000.000Z-2"]


def test_default_names_and_suffixes() -> None:
    assert default_snapshot_name(datetime(2026, 11, 26, 1, 2, 3, 42_999, tzinfo=UTC)) == "20261126T010203.042Z"
    assert unique_name("n", {"n", "n-2"}.__contains__) == "n-3"
    assert unique_name("n", set().__contains__) == "n"


def test_domain_uids_survive_a_restart_and_not_a_destroy(tmp_path: Path) -> None:
    uids = DomainUids(tmp_path)
    first = uids.uid("web")
    uuid.UUID(first)
    assert uids.of(["web", "db"])[0] == first and DomainUids(tmp_path).uid("web") == first
    assert DomainUids(tmp_path).name(first) == "web"
    uids.forget("web")
    assert DomainUids(tmp_path).known("web") == ""
    # Brought back by a revert: the uid its snapshot recorded.
    uids.adopt("web", first)
    assert DomainUids(tmp_path).uid("web") == first
    uids.adopt("web", "another")
    assert uids.uid("web") == first


def test_every_reason_the_agent_raises_is_listed_in_the_proto() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "agent").rglob("*.py"))
    raised = set(re.findall(r'(?:reason=|default_reason = |default_reason: str = )"([A-Z_]+)"', source))
    risks = set(re.findall(r'Risk\(\s*"([A-Z_]+)"', source))
    header = (REPO / "proto/domsnap/v1/domsnap.proto").read_text().split('syntax = "proto3";')[0]
    listed = set(re.findall(r"\b[A-Z][A-Z_]+[A-Z]\b", header))
    assert {"DOMAIN_NOT_FOUND", "SNAPSHOT_NOT_FOUND", "OPERATION_NOT_FOUND", "DOMAIN_BUSY", "REVERT_RISKY",
            "REQUEST_ID_REUSED", "INSUFFICIENT_SPACE", "FIELD_REQUIRED"} <= raised
    assert not (raised | risks) - listed, f"reasons raised but not documented: {sorted((raised | risks) - listed)}"


def test_a_risky_revert_reaches_the_client_as_violations_and_the_cli_words_them() -> None:
    risks = [Risk("DOMAIN_GONE", "domains/web", "domain web no longer exists"),
             Risk("LAYER_WRITTEN", "/img/base.qcow2", "disk xvda's frozen layer /img/base.qcow2 was written")]
    err = client_errors.from_status(convert.error_status(RevertRisky("web", "base", risks)), address="unix:/s")
    assert isinstance(err, client_errors.FailedPrecondition)
    assert (err.reason, err.metadata) == ("REVERT_RISKY", {"domain": "web", "snapshot": "base"})
    assert err.violations == tuple(client_errors.Violation(r.type, r.subject, r.description) for r in risks)
    assert client_errors.refusal_line(err) == (
        "refusing to revert web to base: domain web no longer exists; disk xvda's frozen layer /img/base.qcow2 "
        "was written (--force reverts anyway)")


def test_a_finished_operations_error_keeps_its_reason_and_metadata_across_a_restart(tmp_path: Path) -> None:
    op = Operation("op1", OpKind.CREATE, "web", "s1", "r1", state=OpState.FAILED, finished_at=time.time(),
                   error=CommandError(["qemu-img", "create"], 1, "", "disk full"))
    History(tmp_path).record(op)
    (loaded,) = History(tmp_path).load()
    assert loaded.error is not None
    assert (loaded.error.code, loaded.error.reason, loaded.error.metadata) == (
        grpc.StatusCode.INTERNAL, "COMMAND_FAILED", {"command": "qemu-img"})
