"""A request id means one request (AIP-155).

Each mutating request may carry a client-chosen `request_id`. The first
request with an id runs; a retry (same caller, same RPC, same id, same
request) gets the first one's answer, even while the first still runs; the
same id with a different request is refused with INVALID_ARGUMENT naming the
first. Ids are remembered per caller identity, so one caller's ids never
answer another's requests. A request that failed is forgotten: its retry
runs again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

from .errors import InvalidArgument

T = TypeVar("T")

REMEMBERED = 1000
# What names the first request in a refusal, when the request has it.
_SHOWN = ("domain_name", "domain_uid", "domid", "name", "snapshot_name", "snapshot_path", "path")


@dataclass(frozen=True)
class _First:
    fingerprint: bytes
    shown: str
    answer: asyncio.Future[Any]


def _fingerprint(request: Message) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return copy.SerializeToString(deterministic=True)


def _shown(rpc: str, request: Message) -> str:
    present = {f.name for f, _ in request.ListFields()}
    fields = " ".join(f"{n}={getattr(request, n)!r}" for n in _SHOWN if n in present)
    return f"{rpc}({fields})" if fields else rpc


class RequestIds:
    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._remembered = remembered
        self._first: OrderedDict[tuple[str, str, str], _First] = OrderedDict()

    async def once(self, caller: str, rpc: str, request: Message, call: Callable[[], Awaitable[T]]) -> T:
        """`call`'s answer, or the answer of the first request with this caller, RPC and request_id."""
        request_id: str = getattr(request, "request_id", "")
        if not request_id:
            return await call()
        key = (caller, rpc, request_id)
        fingerprint = _fingerprint(request)
        if (first := self._first.get(key)) is not None:
            if first.fingerprint != fingerprint:
                raise InvalidArgument(f"request_id {request_id!r} was already used for a different request, "
                                      f"{first.shown}; a new request needs a new request_id",
                                      reason="REQUEST_ID_REUSED", request_id=request_id)
            answer: T = await asyncio.shield(first.answer)
            return answer
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Read, so that a failure nobody else waited for is not reported as lost.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._first[key] = _First(fingerprint, _shown(rpc, request), future)
        while len(self._first) > self._remembered:
            self._first.popitem(last=False)
        try:
            result = await call()
        except BaseException as err:
            self._first.pop(key, None)
            if isinstance(err, Exception):
                future.set_exception(err)
            else:
                future.cancel()
            raise
        future.set_result(result)
        return result
