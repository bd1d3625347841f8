"""The domsnap client: the CLI, and the library controllers use to drive agents.

    from . import Client, AsyncClient, fan_out, fan_out_async
    from . import errors          # DomsnapError, NotFound, Busy, ...

See api.py (sync), aio.py (asyncio), fanout.py (one call across many agents),
group.py (group snapshots: one instant across domains and agents) and
errors.py (the exception tree).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import errors
    from .aio import AsyncClient
    from .api import Client, connect
    from .calls import Quiesce
    from .errors import (
        AlreadyExists,
        Busy,
        Cancelled,
        DeadlineExceeded,
        DomsnapError,
        FailedPrecondition,
        InternalError,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        TlsError,
        Unavailable,
        Unimplemented,
    )
    from .fanout import Result, fan_out, fan_out_async

# Loaded on first use, so that the CLI (and its shell completion) does not
# pay for the library's imports (grpc.aio, google.rpc) it does not need.
_WHERE = {"AsyncClient": "aio", "Client": "api", "connect": "api", "Quiesce": "calls", "Result": "fanout",
          "fan_out": "fanout", "fan_out_async": "fanout"}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "errors":
        return importlib.import_module(".errors", __name__)
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if name in __all__:
        return getattr(importlib.import_module(".errors", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Busy",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DomsnapError",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Quiesce",
    "ResourceExhausted",
    "Result",
    "TlsError",
    "Unavailable",
    "Unimplemented",
    "connect",
    "errors",
    "fan_out",
    "fan_out_async",
]
