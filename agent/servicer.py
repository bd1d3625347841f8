"""The SnapshotAgent service: proto in, service call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

from . import convert, disk_usage
from .auth import current_identity
from .catalogue import Entry
from .operations import Finished, Operation, Started
from .request_ids import RequestIds
from .service import AgentService
from .snapshot_create import parse_request
from .snapshot_revert import RevertRequest, snapshot_ref

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    Ctx = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")


async def _sizes(entries: Sequence[Entry | None]) -> list[int]:
    """Each snapshot's size on disk (0 for None), counted in a thread: a folder walk never holds up the loop."""
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
        self._ids = RequestIds()

    async def _once(self, rpc: str, request: Message, call: Callable[[], Awaitable[T]]) -> T:
        return await self._ids.once(current_identity(), rpc, request, call)

    async def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: Ctx) -> pb.AgentInfo:
        return convert.agent_info(await self._s.info())

    def _busy(self, name: str) -> str:
        op = self._s.operations.busy_with(name)
        return op.id if op is not None else ""

    async def ListDomains(self, request: pb.ListDomainsRequest, context: Ctx) -> pb.ListDomainsResponse:
        domains = await self._s.list_domains()
        return pb.ListDomainsResponse(
            domains=[convert.domain(d, self._busy(d.name), self._s.problem(d.name)) for d in domains])

    async def GetDomain(self, request: pb.GetDomainRequest, context: Ctx) -> pb.Domain:
        d = await self._s.get_domain(request.domain)
        return convert.domain(d, self._busy(d.name), self._s.problem(d.name))

    async def CreateDomain(self, request: pb.CreateDomainRequest, context: Ctx) -> pb.Domain:
        d = await self._once("CreateDomain", request, lambda: self._s.create_domain(
            request.config, tuple(request.overrides), paused=request.paused, force=request.force,
            source=request.config_name))
        return convert.domain(d)

    async def DestroyDomain(self, request: pb.DestroyDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._once("DestroyDomain", request,
                                               lambda: self._s.destroy_domain(request.domain)))

    async def PauseDomain(self, request: pb.PauseDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._once("PauseDomain", request, lambda: self._s.pause_domain(request.domain)))

    async def UnpauseDomain(self, request: pb.UnpauseDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._once("UnpauseDomain", request,
                                               lambda: self._s.unpause_domain(request.domain)))

    async def ChangeMedium(self, request: pb.ChangeMediumRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._once("ChangeMedium", request, lambda: self._s.change_medium(
            request.domain, request.vdev, request.path)))

    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        req = parse_request(
            request.domain, name=request.name, live=request.live, method=convert.method_from_pb(request.method),
            path=request.path, description=request.description, cfg_text=request.config,
            overrides=tuple(request.overrides), cfg_name=request.config_name,
        )
        if request.dry_run:
            yield pb.OperationEvent(plan=convert.create_plan(await self._s.plan_create(req), req.name))
            return
        op = await self._once("CreateSnapshot", request, lambda: self._s.create_snapshot(req, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def RevertSnapshot(self, request: pb.RevertSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        ref = snapshot_ref(request.snapshot, request.config, tuple(request.overrides), request.config_name)
        req = RevertRequest(request.domain, ref, convert.run_after_from_pb(request.run_state), request.force,
                            request.reset_nvram)
        if request.dry_run:
            yield pb.OperationEvent(plan=convert.revert_plan(await self._s.plan_revert(req)))
            return
        op = await self._once("RevertSnapshot", request, lambda: self._s.revert_snapshot(req, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        if request.dry_run:
            plan = await self._s.plan_delete(request.domain, request.snapshot, request.children)
            yield pb.OperationEvent(plan=convert.delete_plan(plan))
            return
        op = await self._once("DeleteSnapshot", request, lambda: self._s.delete_snapshot(
            request.domain, request.snapshot, request.children, request.request_id))
        async for ev in _stream(op):
            yield ev

    async def WatchOperation(self, request: pb.WatchOperationRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        async for ev in _stream(self._s.operations.get(request.operation_id)):
            yield ev

    async def CancelOperation(self, request: pb.CancelOperationRequest, context: Ctx) -> pb.Operation:
        return convert.operation(self._s.operations.cancel(request.operation_id))

    async def ListOperations(self, request: pb.ListOperationsRequest, context: Ctx) -> pb.ListOperationsResponse:
        ops = await self._s.list_operations(request.domain)
        sizes = await _sizes([_result(op) for op in ops])
        return pb.ListOperationsResponse(
            operations=[convert.operation(op, n) for op, n in zip(ops, sizes, strict=True)])

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        return convert.snapshot_page(
            await self._s.list_snapshots(request.domain, request.page_size, request.page_token))

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Ctx) -> pb.Snapshot:
        entry = await self._s.get_snapshot(request.domain, request.snapshot)
        return convert.snapshot(entry, (await _sizes([entry]))[0], with_manifest=request.manifest)

    async def EditSnapshot(self, request: pb.EditSnapshotRequest, context: Ctx) -> pb.Snapshot:
        description = request.description if request.HasField("description") else None
        entry = await self._s.edit_snapshot(request.domain, request.snapshot, description=description,
                                            new_name=request.new_name, request_id=request.request_id)
        return convert.snapshot(entry, (await _sizes([entry]))[0])
