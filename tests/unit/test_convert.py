"""Errors as they leave the agent."""

from __future__ import annotations

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
