"""Errors as they leave the agent."""

from __future__ import annotations

import subprocess
import sys

from google.rpc import error_details_pb2

from domsnap.agent.convert import MAX_ERROR_MESSAGE, error_status
from domsnap.agent.errors import InvalidArgument, NotFound, RevertRisky, Risk


def test_error_status_carries_code_message_reason_and_metadata() -> None:
    status = error_status(NotFound("domain 'x' does not exist", reason="DOMAIN_NOT_FOUND", domain="x"))
    assert (status.code, status.message) == (5, "domain 'x' does not exist")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("DOMAIN_NOT_FOUND", "domsnap.dev", {"domain": "x"})


def test_a_class_reason_is_the_default_of_its_raises() -> None:
    info = error_details_pb2.ErrorInfo()
    assert error_status(InvalidArgument("bad")).details[0].Unpack(info)
    assert info.reason == "INVALID_ARGUMENT"


def test_a_risky_revert_lists_each_risk_as_a_precondition_violation() -> None:
    risks = [Risk("DOMAIN_GONE", "domains/web", "domain web no longer exists"),
             Risk("HYPERVISOR_CHANGED", "/s/memory.save", "the memory image was made by QEMU 7.1")]
    status = error_status(RevertRisky("web", "base", risks))
    info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.PreconditionFailure()
    assert status.code == 9 and status.details[0].Unpack(info) and status.details[1].Unpack(failure)
    assert (info.reason, dict(info.metadata)) == ("REVERT_RISKY", {"domain": "web", "snapshot": "base"})
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [
        (r.type, r.subject, r.description) for r in risks]


def test_a_message_quoting_huge_input_is_cut_to_fit_in_metadata() -> None:
    status = error_status(InvalidArgument("invalid snapshot name " + "x" * 20000))
    assert len(status.message) == MAX_ERROR_MESSAGE + 1 and status.message.endswith("…")
    assert len(status.SerializeToString()) < 4096



def test_a_failed_operation_renders_as_json_in_a_client_alone() -> None:
    """The CLI's --json view of a failed operation, in a process that has only
    the client loaded (the agent's modules would register ErrorInfo for it)."""
    status = error_status(NotFound("gone", reason="SNAPSHOT_NOT_FOUND"))
    script = (
        "import sys\n"
        "from domsnap.client.views import to_dict\n"
        "from domsnap.v1 import domsnap_pb2 as pb\n"
        "assert 'domsnap.agent' not in sys.modules\n"
        "op = pb.Operation(id='op1')\n"
        f"op.error.ParseFromString({status.SerializeToString()!r})\n"
        "print(to_dict(pb.OperationEvent(finished=op))['finished']['error']['details'][0]['reason'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SNAPSHOT_NOT_FOUND"
