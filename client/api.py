"""The client library for controllers, synchronous: one `Client` per agent.

    from . import Client

    with Client("unix:/run/domsnap/domsnapd.sock") as agent:
        snap = agent.create_snapshot("web", on_progress=lambda p: print(p.phase, p.percent))

Addresses are those of `domsnap -H`: `unix:PATH`, `HOST:PORT`, `[IPV6]:PORT`
(default: $DOMSNAP_HOST, else the agent's default socket). On TCP, `ca`,
`cert` and `key` (paths of PEM files) make the connection mutual TLS.
Results are the API's messages (domsnap.v1: Domain, Snapshot, Operation);
failures raise the exceptions of `domsnap.client.errors`. Unary calls give up
after `timeout` seconds; operation streams run as long as their operation
unless given a timeout. Every mutating call has a `request_id` (default: a
fresh one): repeating a call with the same id returns the first one's
operation instead of starting another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

from . import calls, connection, errors
from .calls import DEFAULT_TIMEOUT, EventCallback, Method, ProgressCallback, Quiesce, RunState

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Client:
    """A connection to one agent. Thread-safe; close it (or use `with`) when done."""

    def __init__(self, address: str | None = None, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.address = calls.parse(address)
        self.tls = connection.TlsFiles(ca, cert, key)
        self.timeout = timeout
        self.channel = connection.open_channel(self.address, calls.credentials(self.address, self.tls))
        self.stub = pb_grpc.SnapshotAgentStub(self.channel)

    def close(self) -> None:
        """Close the channel; calls still running on it end with Cancelled."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address.text!r})"

    # ---------------------------------------------------------------- plumbing

    def _call(self, method: Callable[..., Resp], request: object, timeout: float | None) -> Resp:
        timeout = timeout if timeout is not None else self.timeout
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self.address, self.tls, channel=self.channel, timeout=timeout) from err

    def _stream(self, start: Callable[..., Iterator[pb.OperationEvent]], request: object,
                timeout: float | None) -> Generator[pb.OperationEvent, None, None]:
        """An operation's events up to `finished`; the call is cancelled if the caller stops early."""
        stream = start(request, timeout=timeout)
        outcome = calls.Outcome(self.address, None)
        try:
            for event in stream:
                yield event
                if outcome.see(event):
                    return
        except grpc.RpcError as err:
            raise outcome.broken(err, self.tls, self.channel) from err
        finally:
            stream.cancel()  # type: ignore[attr-defined]

    def plan(self, events: Generator[pb.OperationEvent, None, None]) -> pb.Plan:
        """The plan a `*_events(..., dry_run=True)` call answers: what the operation
        would do, validated as it would be (a refusal raises the same error)."""
        outcome = calls.Outcome(self.address, None)
        with contextlib.closing(events):
            for event in events:
                outcome.see(event)
        if outcome.plan is None:
            raise errors.InternalError("the agent answered a dry run with no plan", address=self.address.text)
        return outcome.plan

    def follow(self, events: Generator[pb.OperationEvent, None, None], *,
               on_progress: ProgressCallback | None = None, on_event: EventCallback | None = None) -> pb.Operation:
        """Follow an operation's events (from a `*_events` call or `watch`) to its end:
        each event to `on_event`, each progress to `on_progress`; the finished
        Operation, or its error raised. An exception in a callback (Ctrl-C
        too) cancels the stream, never the operation."""
        outcome = calls.Outcome(self.address, on_progress, on_event)
        # Closed even when on_progress raises: the call is cancelled then and there.
        with contextlib.closing(events):
            for event in events:
                outcome.see(event)
        return outcome.result()

    # ------------------------------------------------------------------ agent

    def info(self, *, timeout: float | None = None) -> pb.AgentInfo:
        return self._call(self.stub.GetAgentInfo, pb.GetAgentInfoRequest(), timeout)

    # ---------------------------------------------------------------- domains

    def list_domains(self, *, full: bool = False, timeout: float | None = None) -> list[pb.Domain]:
        """Every domain (every page); with `full`, each one's config text and disks too."""
        out: list[pb.Domain] = []
        page = None
        while (request := calls.next_domains_page(page, full=full)) is not None:
            page = self._call(self.stub.ListDomains, request, timeout)
            out.extend(page.domains)
        return out

    def get_domain(self, domain: str, *, timeout: float | None = None) -> pb.Domain:
        """A domain by name or domid (all digits)."""
        return self._call(self.stub.GetDomain, pb.GetDomainRequest(**calls.domain_ref(domain)), timeout)

    def create_domain(self, config: str, *, overrides: Sequence[str] = (), paused: bool = False, force: bool = False,
                      config_name: str = "", request_id: str | None = None, timeout: float | None = None,
                      ) -> pb.Domain:
        """Start a domain from xl.cfg text (`domsnap create`); `force` starts it on a
        fresh overlay where a disk is a snapshot's frozen layer, instead of refusing."""
        request = calls.create_domain_request(config, overrides=overrides, paused=paused, force=force,
                                              config_name=config_name, request_id=request_id)
        return self._call(self.stub.CreateDomain, request, timeout)

    def destroy_domain(self, domain: str, *, request_id: str | None = None, timeout: float | None = None,
                       ) -> pb.Domain:
        request = pb.DestroyDomainRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain))
        return self._call(self.stub.DestroyDomain, request, timeout)

    def pause_domain(self, domain: str, *, request_id: str | None = None, timeout: float | None = None) -> pb.Domain:
        request = pb.PauseDomainRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain))
        return self._call(self.stub.PauseDomain, request, timeout)

    def unpause_domain(self, domain: str, *, request_id: str | None = None, timeout: float | None = None,
                       ) -> pb.Domain:
        request = pb.UnpauseDomainRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain))
        return self._call(self.stub.UnpauseDomain, request, timeout)

    def change_medium(self, domain: str, vdev: str, path: str = "", *, request_id: str | None = None,
                      timeout: float | None = None) -> pb.Domain:
        """Put the image at `path` into the domain's CD-ROM drive `vdev` (xl cd-insert); "" ejects it."""
        request = pb.ChangeMediumRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain),
                                         vdev=vdev, path=path)
        return self._call(self.stub.ChangeMedium, request, timeout)

    # -------------------------------------------------------------- snapshots

    def list_snapshots(self, domain: str = "", *, full: bool = False, timeout: float | None = None,
                       ) -> list[pb.Snapshot]:
        """One domain's snapshots, or every domain's (every page of them); with `full`, their disks too."""
        out: list[pb.Snapshot] = []
        page = None
        while (request := calls.next_snapshots_page(domain, page, full=full)) is not None:
            page = self._call(self.stub.ListSnapshots, request, timeout)
            out.extend(page.snapshots)
        return out

    def get_snapshot(self, domain: str, snapshot: str, *, manifest: bool = False, timeout: float | None = None,
                     ) -> pb.Snapshot:
        """A snapshot by name, or by its directory (an absolute path on the agent's host);
        with `manifest`, its snapshot.json text in `.manifest` too."""
        request = pb.GetSnapshotRequest(**calls.domain_ref(domain), **calls.snapshot_ref(snapshot), manifest=manifest)
        return self._call(self.stub.GetSnapshot, request, timeout)

    def edit_snapshot(self, domain: str, snapshot: str, *, description: str | None = None, new_name: str = "",
                      request_id: str | None = None, timeout: float | None = None) -> pb.Snapshot:
        """Change a snapshot's description (None: unchanged) or its name (FailedPrecondition
        where a disk holds the name: qcow2 tags, LVM volumes); the snapshot as it is now."""
        request = pb.EditSnapshotRequest(request_id=calls.new_request_id(request_id), **calls.domain_ref(domain),
                                         **calls.snapshot_ref(snapshot), description=description, new_name=new_name)
        return self._call(self.stub.EditSnapshot, request, timeout)

    def create_snapshot_events(self, domain: str, *, name: str = "", live: bool = False, method: Method | None = None,
                               path: str = "", description: str = "", config: str = "",
                               overrides: Sequence[str] = (), config_name: str = "", dry_run: bool = False,
                               request_id: str | None = None, timeout: float | None = None,
                               quiesce: Quiesce | None = None, labels: Mapping[str, str] | None = None,
                               ) -> Generator[pb.OperationEvent, None, None]:
        """The create's events: `started` (the operation's id), `progress`..., `finished`.

        A request the agent refuses raises before the first event; an
        operation that fails ends with a `finished` event that holds its
        error (`create_snapshot` raises it instead). With `dry_run`, one
        `plan` event (see `plan`). `config_name` names the cfg text in messages.
        """
        request = calls.create_request(domain, name=name, live=live, method=method, path=path,
                                       description=description, config=config, overrides=overrides,
                                       config_name=config_name, dry_run=dry_run, request_id=request_id,
                                       quiesce=quiesce, labels=labels)
        return self._stream(self.stub.CreateSnapshot, request, timeout)

    def create_snapshot(self, domain: str, *, name: str = "", live: bool = False, method: Method | None = None,
                        path: str = "", description: str = "", config: str = "", overrides: Sequence[str] = (),
                        request_id: str | None = None, on_progress: ProgressCallback | None = None,
                        timeout: float | None = None, quiesce: Quiesce | None = None,
                        labels: Mapping[str, str] | None = None) -> pb.Snapshot:
        """Snapshot the domain (RAM and every disk at one instant); the new Snapshot.

        `method`: "internal", "external", or None for each disk's cheapest.
        `quiesce`: freeze the guest's filesystems around the instant (calls.Quiesce).
        `labels`: recorded with it (`domsnap.dev/schedule` marks a schedule's).
        `on_progress` is called with each pb.Progress as the operation goes.
        """
        events = self.create_snapshot_events(domain, name=name, live=live, method=method, path=path,
                                             description=description, config=config, overrides=overrides,
                                             request_id=request_id, timeout=timeout, quiesce=quiesce, labels=labels)
        return self.follow(events, on_progress=on_progress).result

    def revert_snapshot_events(self, domain: str, snapshot: str = "", *, run_state: RunState | None = None,
                               force: bool = False, config: str = "", overrides: Sequence[str] = (),
                               config_name: str = "", reset_nvram: bool = False, dry_run: bool = False,
                               request_id: str | None = None, timeout: float | None = None,
                               ) -> Generator[pb.OperationEvent, None, None]:
        request = calls.revert_request(domain, snapshot, run_state=run_state, force=force, config=config,
                                       overrides=overrides, config_name=config_name, reset_nvram=reset_nvram,
                                       dry_run=dry_run, request_id=request_id)
        return self._stream(self.stub.RevertSnapshot, request, timeout)

    def revert_snapshot(self, domain: str, snapshot: str = "", *, run_state: RunState | None = None,
                        force: bool = False, config: str = "", overrides: Sequence[str] = (),
                        request_id: str | None = None, on_progress: ProgressCallback | None = None,
                        timeout: float | None = None) -> pb.Snapshot:
        """Take the domain back to the snapshot; the Snapshot it is now at.

        `run_state`: "running", "paused", or None for the state at the
        snapshot. `force` allows the risky reverts FailedPrecondition names.
        """
        events = self.revert_snapshot_events(domain, snapshot, run_state=run_state, force=force, config=config,
                                             overrides=overrides, request_id=request_id, timeout=timeout)
        return self.follow(events, on_progress=on_progress).result

    def delete_snapshot_events(self, domain: str, snapshot: str, *, children: bool = False, dry_run: bool = False,
                               request_id: str | None = None, timeout: float | None = None,
                               ) -> Generator[pb.OperationEvent, None, None]:
        request = calls.delete_request(domain, snapshot, children=children, dry_run=dry_run, request_id=request_id)
        return self._stream(self.stub.DeleteSnapshot, request, timeout)

    def delete_snapshot(self, domain: str, snapshot: str, *, children: bool = False, request_id: str | None = None,
                        on_progress: ProgressCallback | None = None, timeout: float | None = None) -> pb.Operation:
        """Delete a snapshot (and with `children`, those taken on top of it); the finished Operation."""
        return self.follow(self.delete_snapshot_events(domain, snapshot, children=children, request_id=request_id,
                                                      timeout=timeout), on_progress=on_progress)

    # ------------------------------------------------------------- operations

    def watch(self, operation_id: str, *, timeout: float | None = None,
              ) -> Generator[pb.OperationEvent, None, None]:
        """Re-attach to an operation: `started` (as it is now), its progress, `finished`."""
        return self._stream(self.stub.WatchOperation, pb.WatchOperationRequest(operation_id=operation_id), timeout)

    def wait(self, operation_id: str, *, on_progress: ProgressCallback | None = None,
             timeout: float | None = None) -> pb.Operation:
        """Re-attach to an operation and wait for its end; the finished Operation, or its error."""
        return self.follow(self.watch(operation_id, timeout=timeout), on_progress=on_progress)

    def cancel(self, operation_id: str, *, timeout: float | None = None) -> pb.Operation:
        """Ask an operation to stop and roll back; FailedPrecondition past its point of no return."""
        return self._call(self.stub.CancelOperation, pb.CancelOperationRequest(operation_id=operation_id), timeout)

    def list_operations(self, domain: str = "", *, state: pb.OperationState.ValueType = pb.OPERATION_STATE_UNSPECIFIED,
                        kind: pb.OperationKind.ValueType = pb.OPERATION_KIND_UNSPECIFIED, request_id: str = "",
                        timeout: float | None = None) -> list[pb.Operation]:
        """Operations newest first (every page), filtered by domain, state, kind, request id."""
        first = calls.operations_request(domain, state=state, kind=kind, request_id=request_id)
        out: list[pb.Operation] = []
        page = None
        while (request := calls.next_operations_page(first, page)) is not None:
            page = self._call(self.stub.ListOperations, request, timeout)
            out.extend(page.operations)
        return out

    def get_operation(self, operation_id: str, *, timeout: float | None = None) -> pb.Operation:
        return self._call(self.stub.GetOperation, pb.GetOperationRequest(operation_id=operation_id), timeout)

    # ------------------------------------------------------------ change feed

    def watch_events(self, since: str = "", *, domain: str = "", timeout: float | None = None,
                     ) -> Generator[pb.Event, None, None]:
        """The change feed after `since` (an Event's token, or AgentInfo.event_token;
        "" : from now), for ever or until `timeout`. Resume after an error from
        the last event's token; EventsExpired (OUT_OF_RANGE) means list again."""
        stream = self.stub.WatchEvents(calls.events_request(since, domain), timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err, self.address, self.tls, channel=self.channel, timeout=timeout) from err
        finally:
            stream.cancel()


def connect(address: str | None = None, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
            timeout: float | None = DEFAULT_TIMEOUT) -> Client:
    """A Client for the agent at `address` (the connection itself is made on the first call)."""
    return Client(address, ca=ca, cert=cert, key=key, timeout=timeout)
