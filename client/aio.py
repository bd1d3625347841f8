"""The client library for controllers, on asyncio: `AsyncClient` has the
calls of `Client` (api.py), as coroutines, and operation events as async
iterators:

    async with AsyncClient("unix:/run/domsnap/domsnapd.sock") as agent:
        async for event in agent.create_snapshot_events("web"):
            ...

Same addresses, TLS options, results and errors as `Client`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

from . import calls, connection, errors
from .calls import DEFAULT_TIMEOUT, Method, ProgressCallback, Quiesce, RunState

Resp = TypeVar("Resp")


class AsyncClient:
    """A connection to one agent, for one event loop; close it (or use `async with`) when done."""

    def __init__(self, address: str | None = None, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.address = calls.parse(address)
        self.tls = connection.TlsFiles(ca, cert, key)
        self.timeout = timeout
        self.channel = connection.open_aio_channel(self.address, calls.credentials(self.address, self.tls))
        self.stub = pb_grpc.SnapshotAgentStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.address.text!r})"

    # ---------------------------------------------------------------- plumbing

    async def _call(self, method: Callable[..., Awaitable[Resp]], request: object, timeout: float | None) -> Resp:
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self.address, self.tls) from err

    async def _stream(self, start: Callable[..., Any], request: object,
                      timeout: float | None) -> AsyncGenerator[pb.OperationEvent, None]:
        call = start(request, timeout=timeout)
        outcome = calls.Outcome(self.address, None)
        try:
            async for event in call:
                yield event
                if outcome.see(event):
                    return
        except grpc.RpcError as err:
            raise outcome.broken(err, self.tls) from err
        finally:
            call.cancel()

    async def _wait(self, events: AsyncGenerator[pb.OperationEvent, None],
                    on_progress: ProgressCallback | None) -> pb.Operation:
        outcome = calls.Outcome(self.address, on_progress)
        # Closed even when on_progress raises: the call is cancelled then and there.
        async with contextlib.aclosing(events):
            async for event in events:
                outcome.see(event)
        return outcome.result()

    # ------------------------------------------------------------------ agent

    async def info(self, *, timeout: float | None = None) -> pb.AgentInfo:
        return await self._call(self.stub.GetAgentInfo, pb.GetAgentInfoRequest(), timeout)

    # ---------------------------------------------------------------- domains

    async def list_domains(self, *, full: bool = False, timeout: float | None = None) -> list[pb.Domain]:
        out: list[pb.Domain] = []
        page = None
        while (request := calls.next_domains_page(page, full=full)) is not None:
            page = await self._call(self.stub.ListDomains, request, timeout)
            out.extend(page.domains)
        return out

    async def get_domain(self, domain: str, *, timeout: float | None = None) -> pb.Domain:
        return await self._call(self.stub.GetDomain, pb.GetDomainRequest(**calls.domain_ref(domain)), timeout)

    async def unpause_domain(self, domain: str, *, request_id: str | None = None, timeout: float | None = None,
                             ) -> pb.Domain:
        request = pb.UnpauseDomainRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain))
        return await self._call(self.stub.UnpauseDomain, request, timeout)

    # -------------------------------------------------------------- snapshots

    async def list_snapshots(self, domain: str = "", *, full: bool = False, timeout: float | None = None,
                             ) -> list[pb.Snapshot]:
        out: list[pb.Snapshot] = []
        page = None
        while (request := calls.next_snapshots_page(domain, page, full=full)) is not None:
            page = await self._call(self.stub.ListSnapshots, request, timeout)
            out.extend(page.snapshots)
        return out

    async def get_snapshot(self, domain: str, snapshot: str, *, timeout: float | None = None) -> pb.Snapshot:
        return await self._call(self.stub.GetSnapshot, pb.GetSnapshotRequest(
            **calls.domain_ref(domain), **calls.snapshot_ref(snapshot)),
                                timeout)

    def create_snapshot_events(self, domain: str, *, name: str = "", live: bool = False, method: Method | None = None,
                               path: str = "", description: str = "", config: str = "",
                               overrides: Sequence[str] = (), request_id: str | None = None,
                               timeout: float | None = None, quiesce: Quiesce | None = None,
                               labels: Mapping[str, str] | None = None) -> AsyncGenerator[pb.OperationEvent, None]:
        """`async for event in ...`: `started`, `progress`..., `finished` (see Client.create_snapshot_events)."""
        request = calls.create_request(domain, name=name, live=live, method=method, path=path,
                                       description=description, config=config, overrides=overrides,
                                       request_id=request_id, quiesce=quiesce, labels=labels)
        return self._stream(self.stub.CreateSnapshot, request, timeout)

    async def create_snapshot(self, domain: str, *, name: str = "", live: bool = False,
                              method: Method | None = None, path: str = "", description: str = "", config: str = "",
                              overrides: Sequence[str] = (), request_id: str | None = None,
                              on_progress: ProgressCallback | None = None, timeout: float | None = None,
                              quiesce: Quiesce | None = None, labels: Mapping[str, str] | None = None,
                              ) -> pb.Snapshot:
        events = self.create_snapshot_events(domain, name=name, live=live, method=method, path=path,
                                             description=description, config=config, overrides=overrides,
                                             request_id=request_id, timeout=timeout, quiesce=quiesce, labels=labels)
        return (await self._wait(events, on_progress)).result

    def revert_snapshot_events(self, domain: str, snapshot: str = "", *, run_state: RunState | None = None,
                               force: bool = False, config: str = "", overrides: Sequence[str] = (),
                               request_id: str | None = None, timeout: float | None = None,
                               ) -> AsyncGenerator[pb.OperationEvent, None]:
        request = calls.revert_request(domain, snapshot, run_state=run_state, force=force, config=config,
                                       overrides=overrides, request_id=request_id)
        return self._stream(self.stub.RevertSnapshot, request, timeout)

    async def revert_snapshot(self, domain: str, snapshot: str = "", *, run_state: RunState | None = None,
                              force: bool = False, config: str = "", overrides: Sequence[str] = (),
                              request_id: str | None = None, on_progress: ProgressCallback | None = None,
                              timeout: float | None = None) -> pb.Snapshot:
        events = self.revert_snapshot_events(domain, snapshot, run_state=run_state, force=force, config=config,
                                             overrides=overrides, request_id=request_id, timeout=timeout)
        return (await self._wait(events, on_progress)).result

    async def delete_snapshot(self, domain: str, snapshot: str, *, children: bool = False,
                              request_id: str | None = None, on_progress: ProgressCallback | None = None,
                              timeout: float | None = None) -> pb.Operation:
        request = calls.delete_request(domain, snapshot, children=children, request_id=request_id)
        return await self._wait(self._stream(self.stub.DeleteSnapshot, request, timeout), on_progress)

    # ------------------------------------------------------------- operations

    def watch(self, operation_id: str, *, timeout: float | None = None,
              ) -> AsyncGenerator[pb.OperationEvent, None]:
        return self._stream(self.stub.WatchOperation, pb.WatchOperationRequest(operation_id=operation_id), timeout)

    async def wait(self, operation_id: str, *, on_progress: ProgressCallback | None = None,
                   timeout: float | None = None) -> pb.Operation:
        return await self._wait(self.watch(operation_id, timeout=timeout), on_progress)

    async def cancel(self, operation_id: str, *, timeout: float | None = None) -> pb.Operation:
        return await self._call(self.stub.CancelOperation, pb.CancelOperationRequest(operation_id=operation_id),
                                timeout)

    async def list_operations(self, domain: str = "", *,
                              state: pb.OperationState.ValueType = pb.OPERATION_STATE_UNSPECIFIED,
                              kind: pb.OperationKind.ValueType = pb.OPERATION_KIND_UNSPECIFIED, request_id: str = "",
                              timeout: float | None = None) -> list[pb.Operation]:
        first = calls.operations_request(domain, state=state, kind=kind, request_id=request_id)
        out: list[pb.Operation] = []
        page = None
        while (request := calls.next_operations_page(first, page)) is not None:
            page = await self._call(self.stub.ListOperations, request, timeout)
            out.extend(page.operations)
        return out

    async def get_operation(self, operation_id: str, *, timeout: float | None = None) -> pb.Operation:
        return await self._call(self.stub.GetOperation, pb.GetOperationRequest(operation_id=operation_id), timeout)

    async def watch_events(self, since: str = "", *, domain: str = "", timeout: float | None = None,
                           ) -> AsyncGenerator[pb.Event, None]:
        """As Client.watch_events."""
        call = self.stub.WatchEvents(calls.events_request(since, domain), timeout=timeout)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self.address, self.tls) from err
        finally:
            call.cancel()
