"""Between the agent's dataclasses and the API's messages, both ways."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from domsnap.v1 import domsnap_pb2 as pb

from . import disk_usage
from .catalogue import Entry, Page
from .domain import Domain, RunState
from .errors import DomsnapError, RevertRisky, Risk
from .feed import ChangeKind, Event
from .group_gate import Command, Group
from .group_gate import Phase as GatePhase
from .manifest import Manifest
from .operations import Finished, Operation, OpKind, OpState, Started
from .progress import Phase, Progress
from .service import AgentInfo, OperationFilter, OperationPage
from .snapshot_create import Plan as CreatePlan
from .snapshot_delete import DeletePlan
from .snapshot_revert import RevertPlan, RunAfter
from .storage.base import DiskRecord, Method

ERROR_DOMAIN = "domsnap.dev"

_STATE = {
    RunState.RUNNING: pb.DOMAIN_STATE_RUNNING,
    RunState.PAUSED: pb.DOMAIN_STATE_PAUSED,
    RunState.SHUTDOWN: pb.DOMAIN_STATE_SHUTDOWN,
    RunState.CRASHED: pb.DOMAIN_STATE_CRASHED,
}
_METHOD = {Method.INTERNAL: pb.SNAPSHOT_METHOD_INTERNAL, Method.EXTERNAL: pb.SNAPSHOT_METHOD_EXTERNAL}
_KIND = {
    OpKind.CREATE: pb.OPERATION_KIND_CREATE_SNAPSHOT,
    OpKind.REVERT: pb.OPERATION_KIND_REVERT_SNAPSHOT,
    OpKind.DELETE: pb.OPERATION_KIND_DELETE_SNAPSHOT,
}
_OP_STATE = {
    OpState.PENDING: pb.OPERATION_STATE_PENDING,
    OpState.RUNNING: pb.OPERATION_STATE_RUNNING,
    OpState.SUCCEEDED: pb.OPERATION_STATE_SUCCEEDED,
    OpState.FAILED: pb.OPERATION_STATE_FAILED,
    OpState.CANCELLING: pb.OPERATION_STATE_CANCELLING,
    OpState.CANCELLED: pb.OPERATION_STATE_CANCELLED,
}
_EVENT_KIND = {kind: pb.EventKind.Value(f"EVENT_KIND_{kind.name}") for kind in ChangeKind}
_KIND_FROM_PB = {v: k for k, v in _KIND.items()}
_OP_STATE_FROM_PB = {v: k for k, v in _OP_STATE.items()}
_RUN_AFTER = {
    pb.RUN_STATE_AFTER_REVERT_UNSPECIFIED: RunAfter.SNAPSHOT,
    pb.RUN_STATE_AFTER_REVERT_SNAPSHOT: RunAfter.SNAPSHOT,
    pb.RUN_STATE_AFTER_REVERT_RUNNING: RunAfter.RUNNING,
    pb.RUN_STATE_AFTER_REVERT_PAUSED: RunAfter.PAUSED,
}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def method_from_pb(value: pb.SnapshotMethod.ValueType) -> Method | None:
    for method, wire in _METHOD.items():
        if wire == value:
            return method
    return None


def state_from_pb(value: pb.DomainState.ValueType) -> RunState | None:
    """A filter's state: None (every state) for UNSPECIFIED."""
    return next((state for state, wire in _STATE.items() if wire == value), None)


def run_after_from_pb(value: pb.RunStateAfterRevert.ValueType) -> RunAfter:
    return _RUN_AFTER.get(value, RunAfter.SNAPSHOT)


def agent_info(info: AgentInfo) -> pb.AgentInfo:
    return pb.AgentInfo(
        agent_version=info.agent_version, driver=info.driver, hypervisor_version=info.hypervisor_version,
        hostname=info.hostname, snapshot_root=str(info.snapshot_root), capabilities=info.capabilities,
        api_version=info.api_version, event_token=info.event_token,
    )


def domain(d: Domain, uid: str, busy_with: str = "", problem: str = "", *, full: bool = True) -> pb.Domain:
    """`full`: with the config text and the disks (the FULL view)."""
    msg = pb.Domain(
        name=d.name, domid=d.domid, memory_mib=d.config.memory_mib, vcpus=d.config.vcpus,
        state=_STATE[d.state], cpu_time=duration(d.cpu_seconds), busy_with_operation=busy_with, problem=problem,
        uid=uid, resource_name=f"domains/{d.name}",
    )
    if full:
        msg.disks.extend(pb.Disk(vdev=x.vdev, target=x.target, format=x.format, read_only=x.access == "ro")
                         for x in d.config.disks)
        msg.config = d.config.shown()
    return msg


def snapshot(entry: Entry, size_bytes: int = 0, *, with_manifest: bool = False) -> pb.Snapshot:
    """`size_bytes` from disk_usage, which reads the disk: never here, on the event loop."""
    m = entry.manifest
    return pb.Snapshot(
        name=m.name, domain=m.domain, path=str(entry.path), description=m.description,
        created_at=timestamp(m.created_at),
        state=pb.DOMAIN_STATE_PAUSED if m.state == "paused" else pb.DOMAIN_STATE_RUNNING,
        live=m.live,
        disks=[pb.DiskSnapshot(vdev=r.vdev, format=r.format, backend=r.backend, method=_METHOD[r.method],
                               image=r.image, tag=r.tag, file=r.file) for r in m.disks],
        memory=pb.MemoryImage(path=m.memory_file, size_bytes=m.memory_bytes),
        parent=m.parent, current=entry.current, size_bytes=size_bytes,
        driver=m.driver, hypervisor_version=m.hypervisor_version, downtime=duration(m.downtime),
        manifest=m.to_json() if with_manifest else "", uid=m.snapshot_uid(),
        resource_name=f"domains/{m.domain}/snapshots/{m.name}", domain_uid=m.domain_uid,
        group=pb.SnapshotGroup(id=m.group["id"], name=m.group["name"], members=m.group["members"]) if m.group
        else None,
        paused_at=timestamp(m.paused_at) if m.paused_at else None,
        resumed_at=timestamp(m.resumed_at) if m.resumed_at else None,
        quiesced=m.quiesced, labels=m.labels,
    )


def snapshot_listing(path: Path, m: Manifest) -> bytes:
    """A snapshot as the catalogue's index stores it (`current` is set per
    listing); called where the catalogue writes its index, off the event loop."""
    entry = Entry(path, m, current=False)
    return snapshot(entry, disk_usage.size_on_disk(entry)).SerializeToString()


def snapshot_page(page: Page, *, full: bool) -> pb.ListSnapshotsResponse:
    """`full`: with the disks (the FULL view)."""
    resp = pb.ListSnapshotsResponse(next_page_token=page.next_token)
    for listed in page.snapshots:
        snap = resp.snapshots.add()
        snap.MergeFromString(listed.listing)
        snap.current = listed.current
        if not full:
            snap.ClearField("disks")
    return resp


def _planned(records: tuple[DiskRecord, ...]) -> list[pb.PlannedDisk]:
    return [pb.PlannedDisk(vdev=r.vdev, method=_METHOD[r.method], backend=r.backend, image=r.image,
                           target=r.tag or r.file) for r in records]


def create_plan(p: CreatePlan, name: str) -> pb.Plan:
    return pb.Plan(kind=pb.OPERATION_KIND_CREATE_SNAPSHOT, domain=p.domain.name, snapshot=name, path=str(p.snapdir),
                   disks=_planned(p.records), memory_path=str(p.memory))


def revert_plan(p: RevertPlan) -> pb.Plan:
    m = p.manifest
    return pb.Plan(kind=pb.OPERATION_KIND_REVERT_SNAPSHOT, domain=m.domain, snapshot=m.name, path=str(p.snapdir),
                   disks=_planned(m.disks), memory_path=m.memory_file, risks=[_violation(r) for r in p.risks],
                   paused=p.paused)


def delete_plan(p: DeletePlan) -> pb.Plan:
    target = p.doomed[-1]
    return pb.Plan(kind=pb.OPERATION_KIND_DELETE_SNAPSHOT, domain=p.domain, snapshot=target.manifest.name,
                   path=str(target.path), disks=_planned(target.manifest.disks),
                   memory_path=target.manifest.memory_file, deletes=[e.manifest.name for e in p.doomed])


_PHASE = {phase: pb.Phase.Value(f"PHASE_{phase.name}") for phase in Phase}


def progress(p: Progress) -> pb.Progress:
    return pb.Progress(phase=_PHASE[p.phase], percent=p.percent, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                       bytes_per_second=p.bytes_per_second, message=p.message, time=timestamp(p.time))


# An error travels in trailing metadata twice (grpc-message and the status
# details), and clients refuse metadata over 8 KiB: a message that quotes a
# caller's oversized input is cut.
MAX_ERROR_MESSAGE = 1024


def _violation(risk: Risk) -> error_details_pb2.PreconditionFailure.Violation:
    return error_details_pb2.PreconditionFailure.Violation(type=risk.type, subject=risk.subject,
                                                           description=risk.description)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_MESSAGE else text[:MAX_ERROR_MESSAGE] + "…"


def error_status(err: DomsnapError) -> status_pb2.Status:
    """The error as a google.rpc.Status: its ErrorInfo (AIP-193) and, for a
    risky revert, a PreconditionFailure with one violation per risk."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN,
                                       metadata={k: _cut(v) for k, v in err.metadata.items()})
    status = status_pb2.Status(code=err.code.value[0], message=_cut(err.message))
    status.details.add().Pack(info)
    if isinstance(err, RevertRisky):
        status.details.add().Pack(error_details_pb2.PreconditionFailure(
            violations=[_violation(r) for r in err.risks]))
    return status


def operation(op: Operation, size_bytes: int = 0) -> pb.Operation:
    msg = pb.Operation(
        id=op.id, kind=_KIND[op.kind], domain=op.domain, snapshot=op.snapshot, state=_OP_STATE[op.state],
        request_id=op.request_id, started_at=timestamp(op.started_at), progress=progress(op.progress),
    )
    if op.finished_at is not None:
        msg.finished_at.CopyFrom(timestamp(op.finished_at))
    if isinstance(op.result, Entry):
        msg.result.CopyFrom(snapshot(op.result, size_bytes))
    elif isinstance(op.result, DeletePlan):
        msg.deleted.extend(e.manifest.name for e in op.result.doomed)
    if op.error is not None:
        msg.error.CopyFrom(error_status(op.error))
    return msg


def event(ev: Started | Progress | Finished, size_bytes: int = 0) -> pb.OperationEvent:
    if isinstance(ev, Started):
        return pb.OperationEvent(started=operation(ev.operation, size_bytes))
    if isinstance(ev, Finished):
        return pb.OperationEvent(finished=operation(ev.operation, size_bytes))
    return pb.OperationEvent(progress=progress(ev))


def operation_filter(request: pb.ListOperationsRequest, domain: str) -> OperationFilter:
    return OperationFilter(domain, _OP_STATE_FROM_PB.get(request.state), _KIND_FROM_PB.get(request.kind),
                           request.request_id)


def operation_page(page: OperationPage, sizes: list[int], *, full: bool) -> pb.ListOperationsResponse:
    """`full`: each result with its disks (the FULL view)."""
    resp = pb.ListOperationsResponse(
        operations=[operation(op, n) for op, n in zip(page.operations, sizes, strict=True)],
        next_page_token=page.next_token, event_token=page.event_token)
    if not full:
        for op in resp.operations:
            if op.HasField("result"):
                op.result.ClearField("disks")
    return resp


def feed_event(ev: Event) -> pb.Event:
    c = ev.change
    msg = pb.Event(token=ev.token, time=timestamp(ev.time), kind=_EVENT_KIND[c.kind], domain=c.domain,
                   snapshot=c.snapshot, operation_id=c.operation_id, previous_name=c.previous_name,
                   domain_uid=c.domain_uid)
    if c.operation_state:
        msg.operation_state = _OP_STATE[OpState(c.operation_state)]
    if c.operation_kind:
        msg.operation_kind = _KIND[OpKind(c.operation_kind)]
    return msg
_GROUP_COMMAND = {pb.GROUP_COMMAND_FREEZE: Command.FREEZE, pb.GROUP_COMMAND_COMMIT: Command.COMMIT,
                  pb.GROUP_COMMAND_ABORT: Command.ABORT}
_GROUP_PHASE = {GatePhase.PREPARED: pb.GROUP_PHASE_PREPARED, GatePhase.FROZEN: pb.GROUP_PHASE_FROZEN}


def group_command(value: pb.GroupCommand.ValueType) -> Command | None:
    """A command after PREPARE; None for one that has no place there."""
    return _GROUP_COMMAND.get(value)


def group(g: pb.SnapshotGroup) -> Group:
    return Group(g.id, g.name, tuple(g.members))


def group_reached(phase: GatePhase, at: float) -> pb.GroupSnapshotEvent:
    return pb.GroupSnapshotEvent(reached=pb.GroupBarrier(phase=_GROUP_PHASE[phase], at=timestamp(at)))
