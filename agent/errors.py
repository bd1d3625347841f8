"""The agent's error tree.

Each class maps to exactly one gRPC status code; the interceptor is the only
place that turns them into statuses. Errors that are the caller's fault
(`caller_fault`) are logged without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class DomsnapError(Exception):
    """Base of every error the agent reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    caller_fault: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomsnapError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    caller_fault = True


class NotFound(DomsnapError):
    code = grpc.StatusCode.NOT_FOUND
    caller_fault = True


class AlreadyExists(DomsnapError):
    code = grpc.StatusCode.ALREADY_EXISTS
    caller_fault = True


class FailedPrecondition(DomsnapError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    caller_fault = True


class Busy(DomsnapError):
    """The domain is busy with another operation."""

    code = grpc.StatusCode.ABORTED
    caller_fault = True


class ResourceExhausted(DomsnapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(DomsnapError):
    code = grpc.StatusCode.PERMISSION_DENIED
    caller_fault = True


class Cancelled(DomsnapError):
    code = grpc.StatusCode.CANCELLED
    caller_fault = True


class Unimplemented(DomsnapError):
    code = grpc.StatusCode.UNIMPLEMENTED
    caller_fault = True


class Unavailable(DomsnapError):
    """The hypervisor (or a process the agent depends on) does not answer."""

    code = grpc.StatusCode.UNAVAILABLE


class InternalError(DomsnapError):
    code = grpc.StatusCode.INTERNAL


class CommandError(InternalError):
    """An external command failed; keeps what was run and what it said."""

    def __init__(self, argv: Sequence[str], rc: int | None, stdout: str, stderr: str) -> None:
        what = "timed out" if rc is None else f"exited with status {rc}"
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"{argv[0]} {what}" + (f": {tail}" if tail else ""))
        self.argv = list(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
