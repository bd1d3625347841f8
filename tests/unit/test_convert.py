"""Errors as they leave the agent."""

from __future__ import annotations

import subprocess
import sys

from google.rpc import error_details_pb2

from domsnap.agent.convert import MAX_ERROR_MESSAGE, error_status
from domsnap.agent.errors import InvalidArgument, NotFound


def test_error_status_carries_code_message_and_reason() -> None:
    status = error_status(NotFound("domain 'x' does not exist"))
    assert (status.code, status.message) == (5, "domain 'x' does not exist")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("NotFound", "domsnap.dev")


def test_a_message_quoting_huge_input_is_cut_to_fit_in_metadata() -> None:
    status = error_status(InvalidArgument("invalid snapshot name " + "x" * 20000))
    assert len(status.message) == MAX_ERROR_MESSAGE + 1 and status.message.endswith("…")
    assert len(status.SerializeToString()) < 4096



def test_a_failed_operation_renders_as_json_in_a_client_alone() -> None:
    """The CLI's --json view of a failed operation, in a process that has only
    the client loaded (the agent's modules would register ErrorInfo for it)."""
    status = error_status(NotFound("gone"))
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
    assert out.stdout.strip() == "NotFound"
