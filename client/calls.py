"""What the sync (api.py) and asyncio (aio.py) clients share: the channel's
credentials, the requests they build, and how an operation's last event
becomes a result or an error. No I/O here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2

from domsnap.v1 import domsnap_pb2 as pb

from . import connection, errors

Method = Literal["internal", "external"]
RunState = Literal["running", "paused"]
ProgressCallback = Callable[[pb.Progress], object]
EventCallback = Callable[[pb.OperationEvent], object]
DEFAULT_TIMEOUT = connection.DEFAULT_TIMEOUT

_METHODS: dict[Method | None, pb.SnapshotMethod.ValueType] = {
    None: pb.SNAPSHOT_METHOD_UNSPECIFIED,
    "internal": pb.SNAPSHOT_METHOD_INTERNAL,
    "external": pb.SNAPSHOT_METHOD_EXTERNAL,
}
_RUN_STATES: dict[RunState | None, pb.RunStateAfterRevert.ValueType] = {
    None: pb.RUN_STATE_AFTER_REVERT_UNSPECIFIED,
    "running": pb.RUN_STATE_AFTER_REVERT_RUNNING,
    "paused": pb.RUN_STATE_AFTER_REVERT_PAUSED,
}


def parse(address: str | None) -> connection.Address:
    try:
        return connection.parse_address(address or connection.default_address())
    except ValueError as err:
        raise errors.InvalidArgument(str(err)) from err


def credentials(address: connection.Address, tls: connection.TlsFiles) -> grpc.ChannelCredentials | None:
    if not connection.uses_tls(address, tls):
        return None
    try:
        return connection.channel_credentials(tls)
    except connection.TlsError as err:
        raise errors.TlsError(str(err), address=address.text) from err


def new_request_id(given: str | None) -> str:
    """The caller's request id, or a fresh one."""
    import uuid  # only mutating calls have one: reads start without it

    return given or str(uuid.uuid4())


def domain_ref(domain: str) -> dict[str, Any]:
    """xl's <Domain> as the request's `domain` oneof: all digits is a domid, anything else a name."""
    return {"domid": int(domain)} if domain.isdigit() else {"domain_name": domain}


def snapshot_ref(snapshot: str) -> dict[str, Any]:
    """A snapshot as the request's `snapshot` oneof: a path (it has a "/") or a name; "" sets neither."""
    if not snapshot:
        return {}
    return {"snapshot_path": snapshot} if "/" in snapshot else {"snapshot_name": snapshot}


def _method(value: Method | None) -> pb.SnapshotMethod.ValueType:
    if value not in _METHODS:
        raise errors.InvalidArgument(f"method {value!r}: expected 'internal', 'external' or None (per disk)")
    return _METHODS[value]


def _run_state(value: RunState | None) -> pb.RunStateAfterRevert.ValueType:
    if value not in _RUN_STATES:
        raise errors.InvalidArgument(f"run_state {value!r}: expected 'running', 'paused' or None (as at the "
                                     "snapshot)")
    return _RUN_STATES[value]


@dataclass(frozen=True)
class Quiesce:
    """A create's guest quiesce: the guest's filesystems frozen through its
    QEMU guest agent around the instant. `best_effort`: a guest that cannot
    be frozen is snapshotted unfrozen; `freeze_timeout`: seconds (0: the
    agent's 10)."""

    enabled: bool = True
    best_effort: bool = False
    freeze_timeout: float = 0.0


def create_request(domain: str, *, name: str = "", live: bool = False, method: Method | None = None, path: str = "",
                   description: str = "", config: str = "", overrides: Sequence[str] = (), config_name: str = "",
                   dry_run: bool = False, request_id: str | None = None, quiesce: Quiesce | None = None,
                   labels: Mapping[str, str] | None = None) -> pb.CreateSnapshotRequest:
    q = quiesce or Quiesce(enabled=False)
    return pb.CreateSnapshotRequest(
        request_id=new_request_id(request_id), **domain_ref(domain), name=name, live=live,
        method=_method(method), path=path, description=description, config=config, overrides=list(overrides),
        config_name=config_name, dry_run=dry_run, quiesce=q.enabled, quiesce_best_effort=q.best_effort,
        freeze_timeout=duration(q.freeze_timeout) if q.freeze_timeout else None, labels=dict(labels or {}))


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def next_snapshots_page(domain: str, last: pb.ListSnapshotsResponse | None, *, full: bool = False,
                        ) -> pb.ListSnapshotsRequest | None:
    """The request for the listing's next page (AIP-158): the first with `last`
    None, then one per page until the agent says there is no more (None);
    every domain's with domain "", with the disks when `full`."""
    if last is not None and not last.next_page_token:
        return None
    view = pb.VIEW_FULL if full else pb.VIEW_BASIC
    return pb.ListSnapshotsRequest(**(domain_ref(domain) if domain else {}), view=view,
                                   page_token=last.next_page_token if last is not None else "")


def next_domains_page(last: pb.ListDomainsResponse | None, *, full: bool = False) -> pb.ListDomainsRequest | None:
    """As next_snapshots_page, for ListDomains; with the config text and disks when `full`."""
    if last is not None and not last.next_page_token:
        return None
    return pb.ListDomainsRequest(view=pb.VIEW_FULL if full else pb.VIEW_BASIC,
                                 page_token=last.next_page_token if last is not None else "")


def next_operations_page(first: pb.ListOperationsRequest,
                         last: pb.ListOperationsResponse | None) -> pb.ListOperationsRequest | None:
    """As next_snapshots_page, for ListOperations with `first`'s filters."""
    if last is None:
        return first
    if not last.next_page_token:
        return None
    request = pb.ListOperationsRequest()
    request.CopyFrom(first)
    request.page_token = last.next_page_token
    return request


def operations_request(domain: str = "", *, state: pb.OperationState.ValueType = pb.OPERATION_STATE_UNSPECIFIED,
                       kind: pb.OperationKind.ValueType = pb.OPERATION_KIND_UNSPECIFIED,
                       request_id: str = "") -> pb.ListOperationsRequest:
    request = pb.ListOperationsRequest(state=state, kind=kind, request_id=request_id)
    if domain:
        request.domain_name = domain
    return request


def events_request(since: str, domain: str) -> pb.WatchEventsRequest:
    request = pb.WatchEventsRequest(since=since)
    if domain:
        request.domain_name = domain
    return request


def revert_request(domain: str, snapshot: str = "", *, run_state: RunState | None = None, force: bool = False,
                   config: str = "", overrides: Sequence[str] = (), config_name: str = "",
                   reset_nvram: bool = False, dry_run: bool = False, request_id: str | None = None,
                   ) -> pb.RevertSnapshotRequest:
    return pb.RevertSnapshotRequest(
        request_id=new_request_id(request_id), **domain_ref(domain), **snapshot_ref(snapshot), config=config,
        overrides=list(overrides), run_state=_run_state(run_state), force=force, config_name=config_name,
        reset_nvram=reset_nvram, dry_run=dry_run)


def create_domain_request(config: str, *, overrides: Sequence[str] = (), paused: bool = False, force: bool = False,
                          config_name: str = "", request_id: str | None = None) -> pb.CreateDomainRequest:
    return pb.CreateDomainRequest(request_id=new_request_id(request_id), config=config, overrides=list(overrides),
                                  paused=paused, force=force, config_name=config_name)


def delete_request(domain: str, snapshot: str, *, children: bool = False, dry_run: bool = False,
                   request_id: str | None = None) -> pb.DeleteSnapshotRequest:
    return pb.DeleteSnapshotRequest(request_id=new_request_id(request_id), **domain_ref(domain),
                                    **snapshot_ref(snapshot), children=children, dry_run=dry_run)


class Outcome:
    """Follows one operation's events: each to `on_event` (a renderer), progress
    to `on_progress`, the end as a result or an error."""

    def __init__(self, address: connection.Address, on_progress: ProgressCallback | None,
                 on_event: EventCallback | None = None) -> None:
        self._address = address
        self._on_progress = on_progress
        self._on_event = on_event
        self.operation_id = ""
        self.finished: pb.Operation | None = None
        self.plan: pb.Plan | None = None

    def see(self, event: pb.OperationEvent) -> bool:
        """Take one event; True once the operation has finished."""
        if self._on_event is not None:
            self._on_event(event)
        kind = event.WhichOneof("event")
        if kind == "started":
            self.operation_id = event.started.id
        elif kind == "progress" and self._on_progress is not None:
            self._on_progress(event.progress)
        elif kind == "finished":
            self.finished = event.finished
            return True
        elif kind == "plan":
            self.plan = event.plan
            return True
        return False

    def result(self) -> pb.Operation:
        """The finished operation if it succeeded; its error otherwise."""
        op = self.finished
        if op is None:
            raise errors.Unavailable(
                f"the stream of operation {self.operation_id or '?'} ended before the operation did; it may go on: "
                "watch it again", address=self._address.text, operation_id=self.operation_id)
        if op.state != pb.OPERATION_STATE_SUCCEEDED:
            raise errors.from_status(op.error, address=self._address.text, operation_id=op.id)
        return op

    def broken(self, err: grpc.RpcError, tls: connection.TlsFiles, channel: grpc.Channel | None = None,
               ) -> errors.DomsnapError:
        """A stream that failed: the refusal of the request, or a connection lost midway."""
        error = errors.from_rpc_error(err, self._address, tls, channel=channel)
        error.operation_id = self.operation_id
        return error

