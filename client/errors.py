"""The client library's errors: one small tree, one class per gRPC status
code the agent uses, each carrying the agent's message.

    DomsnapError
    ├── InvalidArgument      INVALID_ARGUMENT
    │   └── EventsExpired    OUT_OF_RANGE: a change feed token the agent no longer holds; list again
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION
    ├── Busy                 ABORTED: the domain is busy with another operation
    ├── ResourceExhausted    RESOURCE_EXHAUSTED
    ├── PermissionDenied     PERMISSION_DENIED, UNAUTHENTICATED
    ├── Cancelled            CANCELLED
    ├── Unimplemented        UNIMPLEMENTED
    ├── Unavailable          UNAVAILABLE: the agent cannot be reached, or its hypervisor does not answer
    │   └── TlsError         our TLS files are wrong, or the agent refused our certificate
    ├── DeadlineExceeded     DEADLINE_EXCEEDED: no answer in time
    └── InternalError        INTERNAL, UNKNOWN, DATA_LOSS

An operation that failed (its stream's `finished` event carries a
google.rpc.Status) raises the same classes, with its `operation_id`. The
original grpc.RpcError, when there is one, is the exception's __cause__.

Code acts on `reason` (the agent's google.rpc.ErrorInfo.reason: a stable
UPPER_SNAKE name listed in domsnap.proto, e.g. DOMAIN_BUSY), on `metadata`
(the resources it names: "domain", "snapshot", "operation_id"...) and, for a
risky revert (REVERT_RISKY), on `violations`: each risk as a
google.rpc.PreconditionFailure violation. The message is for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from . import connection

# google.rpc and grpc_status are loaded when an error is met: a command that
# succeeds does not pay for them.
if TYPE_CHECKING:
    from google.rpc import status_pb2


@dataclass(frozen=True)
class Violation:
    """One failed precondition (google.rpc.PreconditionFailure.Violation): a
    risky revert's risk, e.g. type "DOMAIN_GONE", subject "domains/web"."""

    type: str
    subject: str
    description: str


@dataclass(frozen=True)
class Details:
    """What a google.rpc.Status's details say beyond its code and message."""

    reason: str = ""
    metadata: dict[str, str] | None = None
    violations: tuple[Violation, ...] = ()


class DomsnapError(Exception):
    """Base of every error the client library raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: Details | None = None,
                 address: str = "", operation_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        details = details or Details()
        # The agent's stable name for the error (google.rpc.ErrorInfo.reason), e.g. "DOMAIN_BUSY".
        self.reason = details.reason
        self.metadata: dict[str, str] = dict(details.metadata or {})
        self.violations = details.violations
        # The agent it came from ("" when unknown), and the operation that failed.
        self.address = address
        self.operation_id = operation_id


class InvalidArgument(DomsnapError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class EventsExpired(InvalidArgument):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(DomsnapError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomsnapError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomsnapError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Busy(DomsnapError):
    """The domain is busy with another operation (the message names it)."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(DomsnapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(DomsnapError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(DomsnapError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(DomsnapError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(DomsnapError):
    code = grpc.StatusCode.UNAVAILABLE


class TlsError(Unavailable):
    """A TLS setup that cannot work: a file, a key, a certificate, or the agent's refusal of it."""


class DeadlineExceeded(DomsnapError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(DomsnapError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[DomsnapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: EventsExpired,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Busy,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def refusal_line(err: DomsnapError) -> str:
    """The line a command-line user reads for `err`: a risky revert is worded
    from its violations, with the CLI's own way past them; anything else is
    the agent's message."""
    if err.reason == "REVERT_RISKY" and err.violations:
        what = f"{err.metadata.get('domain', '?')} to {err.metadata.get('snapshot', '?')}"
        return (f"refusing to revert {what}: " + "; ".join(v.description for v in err.violations)
                + " (--force reverts anyway)")
    return err.message


def error_class(code: grpc.StatusCode) -> type[DomsnapError]:
    return _BY_CODE.get(code, DomsnapError)


def _details(status: status_pb2.Status | None) -> Details:
    from google.rpc import error_details_pb2

    info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.PreconditionFailure()
    found = Details()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info):
            found = Details(info.reason, dict(info.metadata), found.violations)
        elif detail.Unpack(failure):
            found = Details(found.reason, found.metadata, tuple(
                Violation(v.type, v.subject, v.description) for v in failure.violations))
    return found


def from_status(status: status_pb2.Status, *, address: str = "", operation_id: str = "") -> DomsnapError:
    """The error of a finished operation (its google.rpc.Status)."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    message = " ".join(status.message.split()) or f"operation {operation_id} ended with {code.name}"
    return error_class(code)(message, code=code, details=_details(status), address=address,
                             operation_id=operation_id)


def from_rpc_error(err: grpc.RpcError, address: connection.Address | None = None,
                   tls: connection.TlsFiles | None = None, *, channel: grpc.Channel | None = None,
                   timeout: float | None = None) -> DomsnapError:
    """A failed call as the library's error, the agent's message kept, on one line.

    What gRPC says for itself is reworded, with the way out: a connect
    failure is "cannot reach the agent at ADDR: <OS reason> (<what to do>)",
    or what is wrong with TLS when TLS was used; a deadline names the
    timeout. UNAVAILABLE comes both from a failed connect and from an agent
    whose hypervisor does not answer: given the `channel`, a quick probe
    tells them apart.
    """
    # grpc.Call (sync) and grpc.aio.AioRpcError both have code(), details() and trailing_metadata().
    has_status = callable(getattr(err, "code", None))
    code: grpc.StatusCode = err.code() if has_status else grpc.StatusCode.UNKNOWN
    details = " ".join(((err.details() if has_status else str(err)) or "").split())
    status = None
    if has_status:
        from grpc_status import rpc_status

        try:
            status = rpc_status.from_call(err)
        except (ValueError, AttributeError):
            status = None
    where = address.text if address is not None else ""
    cls = error_class(code)
    message = details or code.name.lower().replace("_", " ")
    if code == grpc.StatusCode.UNAVAILABLE and address is not None:
        uses_tls = tls is not None and connection.uses_tls(address, tls)
        # Without a channel to probe, gRPC's text is all there is to go by.
        unreachable = not connection.is_reachable(channel) if channel is not None else None
        failure = None
        if uses_tls and tls is not None and unreachable is not False:
            failure = connection.tls_failure(details, address, tls)
        if failure is not None:
            cls, message = TlsError, failure
        elif unreachable or (unreachable is None and "failed to connect" in details.lower()):
            message = connection.unreachable_message(address, details, tls_used=uses_tls)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
        message = f"the agent did not answer within {timeout:g} s ({details}); give it longer with --timeout"
    return cls(message, code=code, details=_details(status), address=where)

