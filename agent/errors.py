"""The agent's error tree.

Each class maps to exactly one gRPC status code; the interceptor is the only
place that turns them into statuses. On top of the code, a `reason` (AIP-193's
ErrorInfo.reason, UPPER_SNAKE, listed in domsnap.proto: a stable promise) and
`metadata` naming the resources involved; a class's reason is the default of
its raises. Errors that are the caller's fault (`caller_fault`) are logged
without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc


class DomsnapError(Exception):
    """Base of every error the agent reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    caller_fault: bool = False
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str = "", **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata


class InvalidArgument(DomsnapError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"
    caller_fault = True


class NotFound(DomsnapError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"
    caller_fault = True


class AlreadyExists(DomsnapError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"
    caller_fault = True


class FailedPrecondition(DomsnapError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"
    caller_fault = True


class EventsExpired(DomsnapError):
    """A change feed token the feed no longer holds the events after: list again."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "EVENTS_EXPIRED"
    caller_fault = True


class Busy(DomsnapError):
    """The domain is busy with another operation."""

    code = grpc.StatusCode.ABORTED
    default_reason = "DOMAIN_BUSY"
    caller_fault = True


class ResourceExhausted(DomsnapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "INSUFFICIENT_SPACE"


class PermissionDenied(DomsnapError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"
    caller_fault = True


class Cancelled(DomsnapError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "OPERATION_CANCELLED"
    caller_fault = True


class DeadlineExceeded(DomsnapError):
    """Something outside the agent (a guest) did not finish within the time it was given."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"
    caller_fault = True


class Unavailable(DomsnapError):
    """The hypervisor (or a process the agent depends on) does not answer."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "HYPERVISOR_UNAVAILABLE"


class InternalError(DomsnapError):
    code = grpc.StatusCode.INTERNAL


class CommandError(InternalError):
    """An external command failed; keeps what was run and what it said."""

    def __init__(self, argv: Sequence[str], rc: int | None, stdout: str, stderr: str) -> None:
        what = "timed out" if rc is None else f"exited with status {rc}"
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"{argv[0]} {what}" + (f": {tail}" if tail else ""), reason="COMMAND_FAILED",
                         command=argv[0])
        self.argv = list(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class Risk:
    """One reason a revert is risky (a google.rpc.PreconditionFailure violation)."""

    type: str
    subject: str
    description: str


class RevertRisky(FailedPrecondition):
    """A revert refused for its risks; `force` runs it anyway."""

    default_reason = "REVERT_RISKY"

    def __init__(self, domain: str, snapshot: str, risks: Sequence[Risk]) -> None:
        super().__init__(f"refusing to revert {domain} to {snapshot}: " + "; ".join(r.description for r in risks)
                         + " (force reverts anyway)", domain=domain, snapshot=snapshot)
        self.risks = tuple(risks)


def field_required(field: str, what: str) -> InvalidArgument:
    """The refusal of a request that lacks a required field (AIP-193's FIELD_REQUIRED)."""
    return InvalidArgument(f"{field} is required: {what}", reason="FIELD_REQUIRED", field=field)
