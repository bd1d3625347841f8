"""The SnapshotAgent service: proto in, service call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

from . import convert, disk_usage, refs
from .auth import current_identity
from .catalogue import Entry
from .domain import Domain
from .errors import DomsnapError, InvalidArgument, field_required
from .group_gate import Gate
from .op_history import DAY
from .operations import Finished, Operation, Started
from .quiesce import QuiesceRequest
from .request_ids import RequestIds
from .service import AgentService
from .snapshot_create import CreateRequest, parse_request
from .snapshot_revert import RevertRequest, snapshot_ref

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    Ctx = grpc.aio.ServicerContext[Any, Any]


async def _sizes(entries: Sequence[Entry | None]) -> list[int]:
    """Each snapshot's size on disk (0 for None), counted in a thread: a folder walk never holds up the loop."""
    if not any(entries):
        # No thread to wait for (an operation's `started`, most operations' pages).
        return [0] * len(entries)
    return await asyncio.to_thread(lambda: [disk_usage.size_on_disk(e) if e else 0 for e in entries])


def _result(op: Operation) -> Entry | None:
    return op.result if isinstance(op.result, Entry) else None


async def _stream(op: Operation) -> AsyncIterator[pb.OperationEvent]:
    """The operation's events; a failed one ends the call with its error."""
    async for ev in op.watch():
        size = (await _sizes([_result(ev.operation)]))[0] if isinstance(ev, Started | Finished) else 0
        yield convert.event(ev, size)
        if isinstance(ev, Finished) and ev.operation.error is not None:
            raise ev.operation.error


class SnapshotAgentServicer(pb_grpc.SnapshotAgentServicer):
    def __init__(self, service: AgentService) -> None:
        self._s = service
        self._ids = RequestIds(service.config.state_dir, keep=service.config.operation_history_days * DAY)

    async def _once_domain(self, rpc: str, request: Message, act: Callable[[], Awaitable[Domain]],
                           answer: Callable[[Domain], pb.Domain] | None = None) -> pb.Domain:
        """A domain's lifecycle call, its answer remembered by request id (on disk: a retry after a restart
        gets it too)."""
        async def call() -> pb.Domain:
            return (answer or self._answer)(await act())

        return await self._ids.once_answer(current_identity(), rpc, request, call, pb.Domain.FromString)

    async def _once_operation(self, rpc: str, request: Message, call: Callable[[], Awaitable[Operation]],
                              ) -> Operation:
        return await self._ids.once_operation(current_identity(), rpc, request, call, self._s.operation)

    async def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: Ctx) -> pb.AgentInfo:
        return convert.agent_info(await self._s.info())

    def _domain(self, request: Message, *, required: bool = True) -> str:
        return refs.domain(request, self._s.uids, required=required)

    def _snapshot(self, request: Message, *, required: bool = True) -> str:
        return refs.snapshot(request, self._s.catalogue.path_of_uid, required=required)

    def _create_request(self, request: pb.CreateSnapshotRequest) -> CreateRequest:
        return parse_request(
            self._domain(request), name=request.name, live=request.live, method=convert.method_from_pb(request.method),
            path=request.path, description=request.description, cfg_text=request.config,
            overrides=tuple(request.overrides), cfg_name=request.config_name,
            quiesce=QuiesceRequest.of(request.quiesce, request.quiesce_best_effort,
                                       request.freeze_timeout.ToNanoseconds() / 1e9),
            labels=dict(request.labels),
        )

    def _answer(self, d: Domain, *, full: bool = True) -> pb.Domain:
        op = self._s.operations.busy_with(d.name)
        return convert.domain(d, self._s.uids.uid(d.name), op.id if op is not None else "",
                              self._s.problem(d.name), full=full)

    async def ListDomains(self, request: pb.ListDomainsRequest, context: Ctx) -> pb.ListDomainsResponse:
        domains, next_token = await self._s.list_domains_page(request.page_size, request.page_token,
                                                              convert.state_from_pb(request.state))
        self._s.uids.of(d.name for d in domains)
        full = request.view == pb.VIEW_FULL
        return pb.ListDomainsResponse(domains=[self._answer(d, full=full) for d in domains],
                                      next_page_token=next_token)

    async def GetDomain(self, request: pb.GetDomainRequest, context: Ctx) -> pb.Domain:
        return self._answer(await self._s.get_domain(self._domain(request)))

    async def CreateDomain(self, request: pb.CreateDomainRequest, context: Ctx) -> pb.Domain:
        if not request.config:
            raise field_required("config", "the domain's xl.cfg text")
        return await self._once_domain("CreateDomain", request, lambda: self._s.create_domain(
            request.config, tuple(request.overrides), paused=request.paused, force=request.force,
            source=request.config_name))

    async def DestroyDomain(self, request: pb.DestroyDomainRequest, context: Ctx) -> pb.Domain:
        ref = self._domain(request)
        return await self._once_domain("DestroyDomain", request, lambda: self._s.destroy_domain(ref),
                                       lambda d: convert.domain(d, ""))

    async def PauseDomain(self, request: pb.PauseDomainRequest, context: Ctx) -> pb.Domain:
        ref = self._domain(request)
        return await self._once_domain("PauseDomain", request, lambda: self._s.pause_domain(ref))

    async def UnpauseDomain(self, request: pb.UnpauseDomainRequest, context: Ctx) -> pb.Domain:
        ref = self._domain(request)
        return await self._once_domain("UnpauseDomain", request, lambda: self._s.unpause_domain(ref))

    async def ChangeMedium(self, request: pb.ChangeMediumRequest, context: Ctx) -> pb.Domain:
        ref = self._domain(request)
        if not request.vdev:
            raise field_required("vdev", "the CD-ROM drive's virtual device")
        return await self._once_domain("ChangeMedium", request, lambda: self._s.change_medium(
            ref, request.vdev, request.path))

    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        req = self._create_request(request)
        if request.dry_run:
            yield pb.OperationEvent(plan=convert.create_plan(*await self._s.plan_create(req)))
            return
        op = await self._once_operation("CreateSnapshot", request,
                                        lambda: self._s.create_snapshot(req, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def RevertSnapshot(self, request: pb.RevertSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        ref = snapshot_ref(self._snapshot(request, required=False), request.config, tuple(request.overrides),
                           request.config_name)
        req = RevertRequest(self._domain(request), ref, convert.run_after_from_pb(request.run_state), request.force,
                            request.reset_nvram)
        if request.dry_run:
            yield pb.OperationEvent(plan=convert.revert_plan(await self._s.plan_revert(req)))
            return
        op = await self._once_operation("RevertSnapshot", request,
                                        lambda: self._s.revert_snapshot(req, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        domain, snapshot = self._domain(request), self._snapshot(request)
        if request.dry_run:
            plan = await self._s.plan_delete(domain, snapshot, request.children)
            yield pb.OperationEvent(plan=convert.delete_plan(plan))
            return
        op = await self._once_operation("DeleteSnapshot", request, lambda: self._s.delete_snapshot(
            domain, snapshot, request.children, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def WatchOperation(self, request: pb.WatchOperationRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        if not request.operation_id:
            raise field_required("operation_id", "the operation to watch")
        async for ev in _stream(await self._s.operation(request.operation_id)):
            yield ev

    async def CancelOperation(self, request: pb.CancelOperationRequest, context: Ctx) -> pb.Operation:
        if not request.operation_id:
            raise field_required("operation_id", "the operation to cancel")
        return convert.operation(self._s.operations.cancel(request.operation_id))

    async def ListOperations(self, request: pb.ListOperationsRequest, context: Ctx) -> pb.ListOperationsResponse:
        which = convert.operation_filter(request, self._domain(request, required=False))
        page = await self._s.list_operations(which, request.page_size, request.page_token)
        return convert.operation_page(page, await _sizes([_result(op) for op in page.operations]),
                                      full=request.view == pb.VIEW_FULL)

    async def GetOperation(self, request: pb.GetOperationRequest, context: Ctx) -> pb.Operation:
        if not request.operation_id:
            raise field_required("operation_id", "the operation to get")
        op = await self._s.operation(request.operation_id)
        return convert.operation(op, (await _sizes([_result(op)]))[0])

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Ctx) -> AsyncIterator[pb.Event]:
        async for ev in self._s.feed.watch(request.since, self._domain(request, required=False)):
            yield convert.feed_event(ev)

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        page = await self._s.list_snapshots(self._domain(request, required=False), request.page_size,
                                            request.page_token)
        return convert.snapshot_page(page, full=request.view == pb.VIEW_FULL)

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Ctx) -> pb.Snapshot:
        entry = await self._s.get_snapshot(self._domain(request), self._snapshot(request))
        return convert.snapshot(entry, (await _sizes([entry]))[0], with_manifest=request.manifest)

    async def EditSnapshot(self, request: pb.EditSnapshotRequest, context: Ctx) -> pb.Snapshot:
        description = request.description if request.HasField("description") else None
        entry = await self._s.edit_snapshot(self._domain(request), self._snapshot(request), description=description,
                                            new_name=request.new_name, request_id=request.request_id)
        return convert.snapshot(entry, (await _sizes([entry]))[0])

    async def GroupSnapshot(self, requests: AsyncIterator[pb.GroupSnapshotRequest], context: Ctx,
                            ) -> AsyncIterator[pb.GroupSnapshotEvent]:
        first = await anext(aiter(requests), None)
        if first is None or first.command == pb.GROUP_COMMAND_UNSPECIFIED:
            raise field_required("command", "a group snapshot's member starts with PREPARE")
        if first.command != pb.GROUP_COMMAND_PREPARE:
            raise InvalidArgument("a group snapshot's member starts with PREPARE, which carries its create")
        group = convert.group(first.group)
        if first.create.dry_run or first.create.name != group.name:
            raise InvalidArgument(f"group {group.name!r}: a member's create takes the group's name as its "
                                  "snapshot name, and has no dry run")
        out: asyncio.Queue[pb.GroupSnapshotEvent | DomsnapError | None] = asyncio.Queue()
        gate = self._s.group_gate(group, first.lease.ToNanoseconds() / 1e9,
                                  lambda phase, at: out.put_nowait(convert.group_reached(phase, at)))
        req = self._create_request(first.create)
        started: list[Operation] = []

        async def start() -> Operation:
            started.append(await self._s.create_snapshot(req, first.create.request_id, gate))
            return started[0]

        op = await self._once_operation("GroupSnapshot", first, start)
        if not started:
            # A retried PREPARE: the member's first operation answers, from its events to its end; the
            # call that started it (or its end) drove it, this one takes no command.
            async for event in _stream(op):
                yield pb.GroupSnapshotEvent(operation=event)
            return
        tasks = (asyncio.create_task(_commands(requests, gate)), asyncio.create_task(_forward(op, out)))
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, DomsnapError):
                    raise item
                yield item
        finally:
            # Harmless once committed; else the member resumes and rolls back at once.
            gate.leave("the coordinator's call ended")
            for task in tasks:
                task.cancel()


async def _commands(requests: AsyncIterator[pb.GroupSnapshotRequest], gate: Gate) -> None:
    """The coordinator's commands after PREPARE, to the gate; a call that ends is the coordinator gone."""
    try:
        async for request in requests:
            command = convert.group_command(request.command)
            if command is None:
                gate.leave(f"the coordinator sent {pb.GroupCommand.Name(request.command)} after PREPARE")
                return
            gate.tell(command)
    finally:
        gate.leave("the coordinator's call ended")


async def _forward(op: Operation, out: asyncio.Queue[pb.GroupSnapshotEvent | DomsnapError | None]) -> None:
    """The operation's events into the member's stream, then its error or the end (None)."""
    try:
        async for event in _stream(op):
            out.put_nowait(pb.GroupSnapshotEvent(operation=event))
    except DomsnapError as err:
        out.put_nowait(err)
    else:
        out.put_nowait(None)
