"""The SnapshotAgent service: proto in, service call, proto out. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from domsnap.agent import convert
from domsnap.agent.operations import Finished, Operation
from domsnap.agent.service import AgentService
from domsnap.agent.snapshot_create import parse_request
from domsnap.agent.snapshot_revert import RevertRequest, snapshot_ref
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    Ctx = grpc.aio.ServicerContext[Any, Any]


async def _stream(op: Operation) -> AsyncIterator[pb.OperationEvent]:
    """The operation's events; a failed one ends the call with its error."""
    async for ev in op.watch():
        yield convert.event(ev)
        if isinstance(ev, Finished) and ev.operation.error is not None:
            raise ev.operation.error


class SnapshotAgentServicer(pb_grpc.SnapshotAgentServicer):
    def __init__(self, service: AgentService) -> None:
        self._s = service

    async def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: Ctx) -> pb.AgentInfo:
        return convert.agent_info(await self._s.info())

    def _busy(self, name: str) -> str:
        op = self._s.operations.busy_with(name)
        return op.id if op is not None else ""

    async def ListDomains(self, request: pb.ListDomainsRequest, context: Ctx) -> pb.ListDomainsResponse:
        domains = await self._s.list_domains()
        return pb.ListDomainsResponse(domains=[convert.domain(d, self._busy(d.name)) for d in domains])

    async def GetDomain(self, request: pb.GetDomainRequest, context: Ctx) -> pb.Domain:
        d = await self._s.get_domain(request.domain)
        return convert.domain(d, self._busy(d.name))

    async def CreateDomain(self, request: pb.CreateDomainRequest, context: Ctx) -> pb.Domain:
        d = await self._s.create_domain(request.config, tuple(request.overrides), paused=request.paused,
                                        request_id=request.request_id)
        return convert.domain(d)

    async def DestroyDomain(self, request: pb.DestroyDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._s.destroy_domain(request.domain, request.request_id))

    async def PauseDomain(self, request: pb.PauseDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._s.pause_domain(request.domain, request.request_id))

    async def UnpauseDomain(self, request: pb.UnpauseDomainRequest, context: Ctx) -> pb.Domain:
        return convert.domain(await self._s.unpause_domain(request.domain, request.request_id))

    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        req = parse_request(
            request.domain, name=request.name, live=request.live, method=convert.method_from_pb(request.method),
            path=request.path, description=request.description, cfg_text=request.config,
            overrides=tuple(request.overrides),
        )
        async for ev in _stream(await self._s.create_snapshot(req, request.request_id)):
            yield ev

    async def RevertSnapshot(self, request: pb.RevertSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        ref = snapshot_ref(request.snapshot, request.config, tuple(request.overrides))
        req = RevertRequest(request.domain, ref, convert.run_after_from_pb(request.run_state), request.force)
        async for ev in _stream(await self._s.revert_snapshot(req, request.request_id)):
            yield ev

    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        op = await self._s.delete_snapshot(request.domain, request.snapshot, request.children, request.request_id)
        async for ev in _stream(op):
            yield ev

    async def WatchOperation(self, request: pb.WatchOperationRequest, context: Ctx) -> AsyncIterator[
            pb.OperationEvent]:
        async for ev in _stream(self._s.operations.get(request.operation_id)):
            yield ev

    async def CancelOperation(self, request: pb.CancelOperationRequest, context: Ctx) -> pb.Operation:
        return convert.operation(self._s.operations.cancel(request.operation_id))

    async def ListOperations(self, request: pb.ListOperationsRequest, context: Ctx) -> pb.ListOperationsResponse:
        return pb.ListOperationsResponse(
            operations=[convert.operation(op) for op in await self._s.list_operations(request.domain)])

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        return convert.snapshot_page(
            await self._s.list_snapshots(request.domain, request.page_size, request.page_token))

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Ctx) -> pb.Snapshot:
        return convert.snapshot(await self._s.get_snapshot(request.domain, request.snapshot))
