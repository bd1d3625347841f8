"""A request id means one request (AIP-155).

Each mutating request may carry a client-chosen `request_id` (a group
snapshot member's PREPARE, in the create it carries). The first
request with an id runs; a retry (same caller, same RPC, same id, same
request) gets the first one's answer, even while the first still runs; the
same id with a different request is refused with INVALID_ARGUMENT naming the
first. Ids are remembered per caller identity, so one caller's ids never
answer another's requests. A request that failed is forgotten: its retry
runs again.

Requests are also remembered on disk (`request_ids.sqlite` in the state
directory, kept as long as operations are), so that a retry after the agent
restarted, a `kill -9` included, gets the first answer instead of running
again: a request that starts an operation gets that operation back, as the
agent now knows it (written before the operation's first step); a domain's
create, destroy, pause, unpause or medium change gets the answer it was
given (written as the answer leaves: a call the agent died during is not
remembered, and its retry runs again). In memory, the last 1000 are kept
besides, for retries while the first still runs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from time import time
from typing import Any, TypeVar

from google.protobuf.message import Message

from .errors import InvalidArgument, NotFound
from .operations import Operation
from .sqlite_file import open_db

T = TypeVar("T")
M = TypeVar("M", bound=Message)

REMEMBERED = 1000
FILE = "request_ids.sqlite"
SCHEMA_VERSION = 1
# The unary calls' answers, serialized; added after version 1 (made where missing).
_ANSWERS = """
CREATE TABLE IF NOT EXISTS answers (
    caller TEXT NOT NULL,
    rpc TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    shown TEXT NOT NULL,
    answer BLOB NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (caller, rpc, request_id)
);
"""
_SCHEMA = """
CREATE TABLE requests (
    caller TEXT NOT NULL,
    rpc TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    shown TEXT NOT NULL,
    operation_id TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (caller, rpc, request_id)
);
""" + _ANSWERS
# Per table, a request's row: its fingerprint, how it is shown, and what is kept of it (the operation it
# started, or the answer it got).
_SELECT = {
    "requests": "SELECT fingerprint, shown, operation_id FROM requests WHERE caller = ? AND rpc = ? AND request_id = ?",
    "answers": "SELECT fingerprint, shown, answer FROM answers WHERE caller = ? AND rpc = ? AND request_id = ?",
}
_INSERT = {
    "requests": "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
    "answers": "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
}
# What names the first request in a refusal, when the request has it.
_SHOWN = ("domain_name", "domain_uid", "domid", "name", "snapshot_name", "snapshot_path", "snapshot_uid", "path")


@dataclass(frozen=True)
class _First:
    fingerprint: bytes
    shown: str
    answer: asyncio.Future[Any]


def _holder(request: Message) -> Message | None:
    """The message that holds the request's id: the request itself, or the one request it carries (a group
    member's PREPARE carries its create); None for a request without one."""
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        return request
    for field, value in request.ListFields():
        if field.message_type is not None and "request_id" in field.message_type.fields_by_name and \
                isinstance(value, Message):
            return value
    return None


def _request_id(request: Message) -> str:
    return str(getattr(_holder(request), "request_id", ""))


def _fingerprint(request: Message) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    if (holder := _holder(copy)) is not None:
        holder.ClearField("request_id")
    return copy.SerializeToString(deterministic=True)


def _shown(rpc: str, request: Message) -> str:
    holder = _holder(request) or request
    present = {f.name for f, _ in holder.ListFields()}
    fields = " ".join(f"{n}={getattr(holder, n)!r}" for n in _SHOWN if n in present)
    return f"{rpc}({fields})" if fields else rpc


def _refusal(request_id: str, shown: str) -> InvalidArgument:
    return InvalidArgument(f"request_id {request_id!r} was already used for a different request, "
                           f"{shown}; a new request needs a new request_id",
                           reason="REQUEST_ID_REUSED", request_id=request_id)


class _Started:
    """The requests on disk: (caller, RPC, id) -> fingerprint, and the operation it started or the answer it got."""

    def __init__(self, state_dir: Path, keep: float) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db, _ = open_db(state_dir / FILE, _SCHEMA, SCHEMA_VERSION, what="request ids",
                              if_unusable="starting anew (retries of earlier requests run again)")
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(_ANSWERS)
            self._db.execute("DELETE FROM requests WHERE time < ?", (time() - keep,))
            self._db.execute("DELETE FROM answers WHERE time < ?", (time() - keep,))

    def get(self, table: str, key: tuple[str, str, str]) -> tuple[bytes, str, str | bytes] | None:
        found = self._db.execute(_SELECT[table], key).fetchone()
        return (bytes(found[0]), str(found[1]), found[2]) if found else None

    def put(self, table: str, key: tuple[str, str, str], fingerprint: bytes, shown: str, kept: str | bytes) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(_INSERT[table], (*key, fingerprint, shown, kept, time()))


class RequestIds:
    def __init__(self, state_dir: Path | None = None, *, keep: float = 0.0, remembered: int = REMEMBERED) -> None:
        self._remembered = remembered
        self._first: OrderedDict[tuple[str, str, str], _First] = OrderedDict()
        self._started = _Started(state_dir, keep) if state_dir is not None else None

    async def once_operation(self, caller: str, rpc: str, request: Message, call: Callable[[], Awaitable[Operation]],
                             known: Callable[[str], Awaitable[Operation]]) -> Operation:
        """As `once`, for a request that starts an operation: a retry also gets
        it after an agent restart (`known` finds an operation by its id)."""
        request_id = _request_id(request)
        key = (caller, rpc, request_id)
        if self._started is None or not request_id:
            return await self.once(caller, rpc, request, call)
        if (op_id := self._kept("requests", key, request)) is not None:
            try:
                return await known(str(op_id))
            except NotFound:
                pass  # forgotten with the operation's history: a new request
        started = self._started

        async def start() -> Operation:
            op = await call()
            # Before the operation's first step: it has not run yet.
            started.put("requests", key, _fingerprint(request), _shown(rpc, request), op.id)
            return op

        return await self.once(caller, rpc, request, start)

    async def once_answer(self, caller: str, rpc: str, request: Message, call: Callable[[], Awaitable[M]],
                          parse: Callable[[bytes], M]) -> M:
        """As `once`, for a unary call: a retry also gets the answer after an agent restart."""
        request_id = _request_id(request)
        key = (caller, rpc, request_id)
        if self._started is None or not request_id:
            return await self.once(caller, rpc, request, call)
        if isinstance(answer := self._kept("answers", key, request), bytes):
            return parse(answer)
        started = self._started

        async def answered() -> M:
            result = await call()
            started.put("answers", key, _fingerprint(request), _shown(rpc, request), result.SerializeToString())
            return result

        return await self.once(caller, rpc, request, answered)

    def _kept(self, table: str, key: tuple[str, str, str], request: Message) -> str | bytes | None:
        """What the disk keeps of a first request with this key that this agent has not seen (a restarted
        one's), if any; the same key with another request is refused."""
        if key in self._first or self._started is None or (first := self._started.get(table, key)) is None:
            return None
        fingerprint, shown, kept = first
        if fingerprint != _fingerprint(request):
            raise _refusal(key[2], shown)
        return kept

    async def once(self, caller: str, rpc: str, request: Message, call: Callable[[], Awaitable[T]]) -> T:
        """`call`'s answer, or the answer of the first request with this caller, RPC and request_id."""
        request_id = _request_id(request)
        if not request_id:
            return await call()
        key = (caller, rpc, request_id)
        fingerprint = _fingerprint(request)
        if (first := self._first.get(key)) is not None:
            if first.fingerprint != fingerprint:
                raise _refusal(request_id, first.shown)
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
