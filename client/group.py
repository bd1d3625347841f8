"""Group snapshots: one instant across several domains, on one agent or many.

    from domsnap.client import group

    members = group.parse_members(["db@unix:/run/a.sock", "web@10.0.0.2:7070"])
    snaps = group.create("nightly", members, live=True)       # {member: pb.Snapshot}
    group.revert("nightly", members)                           # all paused, then all resumed

The coordinator is this module: one GroupSnapshot call per member, a
two-phase commit with a barrier (see the API's GroupSnapshot):

1. PREPARE every member; each validates and (live) copies its memory once
   while its guest runs, then answers PREPARED.
2. When all are PREPARED, FREEZE every member: each pauses its guest and
   answers FROZEN.
3. When all are FROZEN, COMMIT every member: each resumes its guest (its
   disks and the rest of its state were taken while it waited) and
   finishes.

Every member's pause interval thus contains the instant the last one paused.
Any failure before COMMIT aborts every member (each resumes its guest and
rolls back); a coordinator that dies is a call that ends, which the agents
treat the same way, and a coordinator that hangs is bounded by the lease.
A member that fails after COMMIT gets the others' snapshots deleted again.
Failures are raised as one `GroupError`, member by member.

Retries are safe: `create` and `revert` take a `request_id`, from which each
member's own request ids are made (`member_request_id`); a retry with the
same one (after a dropped connection, or the coordinator's own restart) is
answered by each member's first operation, never run twice: a create whose
members all committed returns their snapshots, one that failed or was
rolled back raises again (members left committed by a coordinator that
died between its COMMITs are deleted then, as it would have).

Each function has an `_async` twin for a running event loop; the plain ones
run it on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from domsnap.v1 import domsnap_pb2 as pb

from . import calls, connection, errors
from .aio import AsyncClient
from .fanout import fan_out_async
from .views import enum_word, phase_word

T = TypeVar("T")

# How long each agent waits for the coordinator's next command before it
# rolls its member back by itself (agents bound it: group_lease_max_seconds).
DEFAULT_LEASE = 10.0
# Each agent's share of a listing, a revert or a delete, in seconds.
DEFAULT_DEADLINE = 600.0
# The namespace of the ids made from a group call's request id (uuid5).
_IDS = uuid.UUID("5b0f6f0e-53b3-4c43-9d44-3f3a9e0c1d27")


@dataclass(frozen=True, order=True)
class Member:
    domain: str
    # As the caller wrote it (anything `domsnap -H` takes).
    address: str

    def __str__(self) -> str:
        return f"{self.domain}@{self.address}"


def member_request_id(request_id: str, member: Member, step: str) -> str:
    """The request id a group call with `request_id` gives `member`'s `step` ("create", "revert",
    "unpause"): the same in every retry of that call, another for every other call, member and step."""
    return str(uuid.uuid5(_IDS, f"{step}\n{member}\n{request_id}"))


def parse_member(text: str) -> Member:
    """DOMAIN@ADDR; ValueError otherwise."""
    domain, at, address = text.partition("@")
    if not at or not domain or not address:
        raise ValueError(f"{text!r}: a group member is DOMAIN@ADDR (e.g. web@unix:/run/domsnap/domsnapd.sock)")
    connection.parse_address(address)
    return Member(domain, address)


def parse_members(texts: Iterable[str]) -> tuple[Member, ...]:
    """Members, each once; ValueError for none, a malformed one or a repeated one."""
    members = [parse_member(t) for t in texts]
    if not members:
        raise ValueError("a group needs at least one DOMAIN@ADDR")
    seen = set()
    for m in members:
        key = (m.domain, connection.parse_address(m.address).target)
        if key in seen:
            raise ValueError(f"{m}: named twice")
        seen.add(key)
    return tuple(members)


class GroupError(errors.DomsnapError):
    """A group operation that failed on some members: `failures` by member
    (DOMAIN@ADDR), each the error that member met; the code is the first's."""

    def __init__(self, message: str, failures: Mapping[str, errors.DomsnapError]) -> None:
        first = next(iter(failures.values()))
        super().__init__(message + ": " + "; ".join(f"{m}: {e.message}" for m, e in failures.items()),
                         code=first.code)
        self.reason = first.reason
        self.failures = dict(failures)


# Told each member's progress with its phase's word ("memory", "disks", ...), and
# its barriers as the words "prepared" and "frozen" (with their time).
GroupProgress = Callable[[Member, str, pb.Progress], None]


@dataclass(frozen=True)
class Listing:
    """One group snapshot as its members' agents list it."""

    id: str
    name: str
    # Every member the group was made with, as its coordinator named them.
    members: tuple[str, ...]
    # The members asked that hold their snapshot of it.
    found: dict[Member, pb.Snapshot] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every member of the group was asked and holds its snapshot."""
        return len(self.found) == len(self.members)


# ------------------------------------------------------------------ create


class _MemberCall:
    """One member's GroupSnapshot call: commands in, events out."""

    def __init__(self, member: Member, client: AsyncClient, prepare: pb.GroupSnapshotRequest,
                 on_progress: GroupProgress | None) -> None:
        self.member = member
        self._commands: asyncio.Queue[pb.GroupCommand.ValueType | None] = asyncio.Queue()
        self._client = client
        self._on_progress = on_progress
        self._call = client.stub.GroupSnapshot(self._requests(prepare))
        self.operation: pb.Operation | None = None
        self.ended = False
        # Answered by its first operation, committed (a retried request id), before any barrier.
        self.replayed = False

    async def _requests(self, prepare: pb.GroupSnapshotRequest) -> AsyncIterator[pb.GroupSnapshotRequest]:
        yield prepare
        # Open until the call ends: an agent takes a closed request stream for a coordinator gone.
        while (command := await self._commands.get()) is not None:
            yield pb.GroupSnapshotRequest(command=command)

    def send(self, command: pb.GroupCommand.ValueType) -> None:
        self._commands.put_nowait(command)

    async def until(self, phase: pb.GroupPhase.ValueType) -> None:
        """Until the member reaches `phase`, or its first operation answered that it committed (`replayed`);
        its error if it fails or its call ends first."""
        while (event := await self._next()) is not None:
            if event.HasField("reached") and event.reached.phase == phase:
                return
            if self.operation is not None and self.operation.state == pb.OPERATION_STATE_SUCCEEDED:
                self.replayed = True
                return
        if self.operation is not None:
            raise self._error(self.operation)
        raise self._failure(f"the call ended before {pb.GroupPhase.Name(phase)}")

    async def finished(self) -> pb.Snapshot:
        """Until the member's create finishes: its snapshot, or its error."""
        while await self._next() is not None:
            pass
        if self.operation is None:
            raise self._failure("the call ended before the member's create did")
        if self.operation.state != pb.OPERATION_STATE_SUCCEEDED:
            raise self._error(self.operation)
        return self.operation.result

    def _error(self, operation: pb.Operation) -> errors.DomsnapError:
        return errors.from_status(operation.error, address=self.member.address, operation_id=operation.id)

    async def _next(self) -> pb.GroupSnapshotEvent | None:
        if self.ended:
            return None
        try:
            event = await self._call.read()
        except grpc.RpcError as err:
            self.ended = True
            raise errors.from_rpc_error(err, self._client.address, self._client.tls) from err
        if event is grpc.aio.EOF:
            self.ended = True
            self._commands.put_nowait(None)
            return None
        assert isinstance(event, pb.GroupSnapshotEvent)
        self._tell(event)
        return event

    def _tell(self, event: pb.GroupSnapshotEvent) -> None:
        if event.HasField("reached"):
            word = enum_word(pb.GroupPhase.Name(event.reached.phase), "GROUP_PHASE_")
            progress = pb.Progress(message="waiting for the other members", time=event.reached.at)
        elif event.operation.HasField("finished"):
            self.operation = event.operation.finished
            progress = self.operation.progress
            word = phase_word(progress.phase)
        elif event.operation.HasField("progress"):
            progress = event.operation.progress
            word = phase_word(progress.phase)
        else:
            return
        if self._on_progress is not None:
            self._on_progress(self.member, word, progress)

    def _failure(self, what: str) -> errors.DomsnapError:
        return errors.Unavailable(f"{self.member}: {what}", address=self.member.address)

    async def abort(self, wait: float) -> None:
        """ABORT, then wait (at most `wait` s) for the member to end: rolled back, its guest running."""
        self.send(pb.GROUP_COMMAND_ABORT)
        with contextlib.suppress(errors.DomsnapError, TimeoutError):
            async with asyncio.timeout(wait):
                while await self._next() is not None:
                    pass
        self.close()

    def close(self) -> None:
        self._commands.put_nowait(None)
        self._call.cancel()


async def _every(members: Sequence[_MemberCall], step: Callable[[_MemberCall], Awaitable[T]]) -> dict[str, T]:
    """`step` on every member at once. The first failure aborts every member and raises GroupError
    with what failed first (the members aborted because of it are not listed)."""
    tasks = {asyncio.ensure_future(step(m)): m for m in members}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    if pending:
        for m in members:
            m.send(pb.GROUP_COMMAND_ABORT)
        # Their steps end too, now: a member told to abort rolls back and ends its call.
        await asyncio.wait(pending)
        for t in pending:
            if not t.cancelled():
                # Taken, not raised: the abort made these failures (asyncio would
                # otherwise log each as never retrieved when the task is collected).
                t.exception()
    failures = {str(tasks[t].member): _as_error(t.exception(), tasks[t].member) for t in done
                if t.exception() is not None}
    if failures:
        raise GroupError("group snapshot failed, every member rolled back", failures)
    return {str(tasks[t].member): t.result() for t in done}


def _as_error(exc: BaseException | None, member: Member) -> errors.DomsnapError:
    if isinstance(exc, errors.DomsnapError):
        return exc
    return errors.InternalError(f"{type(exc).__name__}: {exc}", address=member.address)


async def create_async(name: str, members: Sequence[Member], *, live: bool = False, description: str = "",
                       lease: float = DEFAULT_LEASE, quiesce: calls.Quiesce | None = None,
                       on_progress: GroupProgress | None = None, request_id: str | None = None,
                       ca: str | None = None, cert: str | None = None, key: str | None = None,
                       ) -> dict[Member, pb.Snapshot]:
    """Snapshot every member at one instant; each member's snapshot (named `name`), or GroupError
    with every member rolled back. A retry with the same `request_id` (and arguments) gets the first
    call's answer."""
    request_id = calls.new_request_id(request_id)
    # The same in a retry: a member's request is then the same request.
    group = pb.SnapshotGroup(id=uuid.uuid5(_IDS, f"group\n{request_id}").hex, name=name,
                             members=[str(m) for m in members])
    clients = {a: AsyncClient(a, ca=ca, cert=cert, key=key, timeout=None) for a in {m.address for m in members}}
    running: list[_MemberCall] = []
    try:
        for m in members:
            create = calls.create_request(m.domain, name=name, live=live, description=description, quiesce=quiesce,
                                          request_id=member_request_id(request_id, m, "create"))
            prepare = pb.GroupSnapshotRequest(command=pb.GROUP_COMMAND_PREPARE, create=create, group=group,
                                              lease=calls.duration(lease))
            running.append(_MemberCall(m, clients[m.address], prepare, on_progress))
        try:
            await _every(running, lambda c: c.until(pb.GROUP_PHASE_PREPARED))
            if any(c.replayed for c in running):
                _all_replayed(name, running)
            else:
                for c in running:
                    c.send(pb.GROUP_COMMAND_FREEZE)
                await _every(running, lambda c: c.until(pb.GROUP_PHASE_FROZEN))
                for c in running:
                    c.send(pb.GROUP_COMMAND_COMMIT)
        except BaseException:
            await asyncio.gather(*(c.abort(lease) for c in running if not c.replayed))
            # A retry of a group whose first coordinator died between its COMMITs: what that one
            # committed goes, as it would have gone.
            await _delete(name, [c.member for c in running if c.replayed], clients)
            raise
        results = await asyncio.gather(*(c.finished() for c in running), return_exceptions=True)
        failures = {str(c.member): _as_error(r, c.member) for c, r in zip(running, results, strict=True)
                    if isinstance(r, BaseException)}
        if failures:
            made = [c.member for c, r in zip(running, results, strict=True) if not isinstance(r, BaseException)]
            await _delete(name, made, clients)
            raise GroupError(f"group snapshot {name} failed after its instant; the members' snapshots made "
                             "are deleted again", failures)
        return {c.member: r for c, r in zip(running, results, strict=True) if isinstance(r, pb.Snapshot)}
    finally:
        for c in running:
            c.close()
        await asyncio.gather(*(client.close() for client in clients.values()))


def _all_replayed(name: str, running: Sequence[_MemberCall]) -> None:
    """A retry that some members answered from a first attempt that committed them: every member must,
    or the group is not whole (GroupError)."""
    strangers = {str(c.member): errors.FailedPrecondition(
        f"{c.member}: its agent does not know this group's request id, which the other members answered from "
        "their first attempt", address=c.member.address) for c in running if not c.replayed}
    if strangers:
        raise GroupError(f"group snapshot {name}: not every member was part of the first attempt; the members' "
                         "snapshots made are deleted again", strangers)


async def _delete(name: str, members: Sequence[Member], clients: dict[str, AsyncClient]) -> None:
    await asyncio.gather(*(clients[m.address].delete_snapshot(m.domain, name) for m in members),
                         return_exceptions=True)


# ------------------------------------------------- list, revert, delete


async def _per_member(members: Sequence[Member], call: Callable[[AsyncClient, Member], Awaitable[T]], *,
                      deadline: float, ca: str | None, cert: str | None, key: str | None,
                      ) -> dict[Member, T | errors.DomsnapError]:
    """`call` for every member, through the fan-out (one connection per agent); each member's result or error."""
    by_address: dict[str, list[Member]] = {}
    for m in members:
        by_address.setdefault(m.address, []).append(m)

    async def on_agent(client: AsyncClient) -> list[T | BaseException]:
        mine = by_address[client.address.text]
        return await asyncio.gather(*(call(client, m) for m in mine), return_exceptions=True)

    results = await fan_out_async(by_address, on_agent, deadline=deadline, ca=ca, cert=cert, key=key)
    out: dict[Member, T | errors.DomsnapError] = {}
    for address, result in results.items():
        for i, m in enumerate(by_address[address]):
            value = result.value[i] if result.value is not None else result.error
            out[m] = _as_error(value, m) if isinstance(value, BaseException) or value is None else value
    return out


def _failures(results: dict[Member, T | errors.DomsnapError]) -> dict[str, errors.DomsnapError]:
    return {str(m): r for m, r in results.items() if isinstance(r, errors.DomsnapError)}


async def _members_of(name: str, members: Sequence[Member], *, deadline: float, ca: str | None, cert: str | None,
                      key: str | None, missing_ok: bool = False) -> dict[Member, pb.Snapshot | None]:
    """Each member's snapshot `name`, checked to be a member of one group of that name; None where absent
    (with `missing_ok`)."""
    got = await _per_member(members, lambda c, m: c.get_snapshot(m.domain, name), deadline=deadline, ca=ca,
                            cert=cert, key=key)
    failures = {k: e for k, e in _failures(got).items() if not (missing_ok and isinstance(e, errors.NotFound))}
    if failures:
        raise GroupError(f"group snapshot {name}: nothing done", failures)
    snaps = {m: s if isinstance(s, pb.Snapshot) else None for m, s in got.items()}
    strangers = {str(m): errors.FailedPrecondition(f"snapshot {name} of domain {m.domain} is not a member of "
                                                   f"group {name}", address=m.address)
                 for m, s in snaps.items() if s is not None and (not s.HasField("group") or s.group.name != name)}
    if strangers:
        raise GroupError(f"group snapshot {name}: nothing done", strangers)
    ids = {s.group.id for s in snaps.values() if s is not None}
    if len(ids) > 1:
        raise errors.FailedPrecondition(f"group snapshot {name}: the members' snapshots come from {len(ids)} "
                                        "different group snapshots of that name; nothing done")
    return snaps


async def revert_async(name: str, members: Sequence[Member], *, paused: bool = False, force: bool = False,
                       on_progress: GroupProgress | None = None, deadline: float = DEFAULT_DEADLINE,
                       request_id: str | None = None, ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> dict[Member, pb.Snapshot]:
    """Every member back to the group's instant: each reverted paused, then (unless `paused`) all resumed
    together, so no member runs ahead of a peer. A member that fails: GroupError, and the members
    reverted stay paused. A retry with the same `request_id` (and arguments) gets each member's first
    revert and resume, not a second revert."""
    request_id = calls.new_request_id(request_id)
    await _members_of(name, members, deadline=deadline, ca=ca, cert=cert, key=key)

    async def revert(client: AsyncClient, m: Member) -> pb.Snapshot:
        progress = (lambda p: on_progress(m, phase_word(p.phase), p)) if on_progress is not None else None
        return await client.revert_snapshot(m.domain, name, run_state="paused", force=force, on_progress=progress,
                                            request_id=member_request_id(request_id, m, "revert"))

    reverted = await _per_member(members, revert, deadline=deadline, ca=ca, cert=cert, key=key)
    if failures := _failures(reverted):
        done = ", ".join(str(m) for m in members if str(m) not in failures)
        raise GroupError(f"group snapshot {name}: revert failed" + (f" (left paused, at the group's instant: "
                                                                     f"{done})" if done else ""), failures)
    if not paused:
        resumed = await _per_member(
            members, lambda c, m: c.unpause_domain(m.domain, request_id=member_request_id(request_id, m, "unpause")),
            deadline=deadline, ca=ca, cert=cert, key=key)
        if failures := _failures(resumed):
            raise GroupError(f"group snapshot {name}: reverted, but not every member resumed", failures)
    return {m: s for m, s in reverted.items() if isinstance(s, pb.Snapshot)}


async def list_async(members: Sequence[Member], *, deadline: float = DEFAULT_DEADLINE, ca: str | None = None,
                     cert: str | None = None, key: str | None = None) -> list[Listing]:
    """The group snapshots the members hold, oldest first; GroupError if a member's agent fails."""
    got = await _per_member(members, lambda c, m: c.list_snapshots(m.domain), deadline=deadline, ca=ca, cert=cert,
                            key=key)
    if failures := _failures(got):
        raise GroupError("group-snapshot-list failed", failures)
    groups: dict[str, Listing] = {}
    first: dict[str, float] = {}
    for m, snaps in got.items():
        assert isinstance(snaps, list)
        for s in snaps:
            if not s.HasField("group"):
                continue
            g = groups.setdefault(s.group.id, Listing(s.group.id, s.group.name, tuple(s.group.members)))
            g.found[m] = s
            first[g.id] = min(first.get(g.id, float("inf")), s.created_at.ToNanoseconds() / 1e9)
    return sorted(groups.values(), key=lambda g: (first[g.id], g.name))


async def delete_async(name: str, members: Sequence[Member], *, on_progress: GroupProgress | None = None,
                       deadline: float = DEFAULT_DEADLINE, ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> list[Member]:
    """Delete the group snapshot on every member that holds it (an incomplete group too); the members
    it was deleted on. A member whose snapshot of that name is no group member: nothing is done."""
    snaps = await _members_of(name, members, deadline=deadline, ca=ca, cert=cert, key=key, missing_ok=True)
    holders = [m for m, s in snaps.items() if s is not None]

    async def delete(client: AsyncClient, m: Member) -> pb.Operation:
        progress = (lambda p: on_progress(m, phase_word(p.phase), p)) if on_progress is not None else None
        return await client.delete_snapshot(m.domain, name, on_progress=progress)

    deleted = await _per_member(holders, delete, deadline=deadline, ca=ca, cert=cert, key=key)
    if failures := _failures(deleted):
        raise GroupError(f"group snapshot {name}: delete failed", failures)
    return holders


# ------------------------------------------------------------ sync twins


def create(name: str, members: Sequence[Member], *, live: bool = False, description: str = "",
           lease: float = DEFAULT_LEASE, quiesce: calls.Quiesce | None = None, on_progress: GroupProgress | None = None,
           request_id: str | None = None, ca: str | None = None, cert: str | None = None,
           key: str | None = None) -> dict[Member, pb.Snapshot]:
    return asyncio.run(create_async(name, members, live=live, description=description, lease=lease, quiesce=quiesce,
                                    on_progress=on_progress, request_id=request_id, ca=ca, cert=cert, key=key))


def revert(name: str, members: Sequence[Member], *, paused: bool = False, force: bool = False,
           on_progress: GroupProgress | None = None, deadline: float = DEFAULT_DEADLINE, request_id: str | None = None,
           ca: str | None = None, cert: str | None = None, key: str | None = None) -> dict[Member, pb.Snapshot]:
    return asyncio.run(revert_async(name, members, paused=paused, force=force, on_progress=on_progress,
                                    deadline=deadline, request_id=request_id, ca=ca, cert=cert, key=key))


def list_groups(members: Sequence[Member], *, deadline: float = DEFAULT_DEADLINE, ca: str | None = None,
                cert: str | None = None, key: str | None = None) -> list[Listing]:
    return asyncio.run(list_async(members, deadline=deadline, ca=ca, cert=cert, key=key))


def delete(name: str, members: Sequence[Member], *, on_progress: GroupProgress | None = None,
           deadline: float = DEFAULT_DEADLINE, ca: str | None = None, cert: str | None = None,
           key: str | None = None) -> list[Member]:
    return asyncio.run(delete_async(name, members, on_progress=on_progress, deadline=deadline, ca=ca, cert=cert,
                                    key=key))
