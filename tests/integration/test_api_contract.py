"""The API's contract against a real agent: each refusal's code, AIP-193
reason and metadata as domsnap.proto lists them, identities (uids, resource
names, unique default names, snapshots named by uid), the lists' views and
pages, and what a destroy answers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import BootGuest, error_info


def refusal(call: Callable[[], Any]) -> tuple[str, str, dict[str, str], list[tuple[str, str]]]:
    """Run a call that must fail: its code, ErrorInfo reason and metadata, and any precondition violations
    (type, subject). A stream must fail before its first message."""
    with pytest.raises(grpc.RpcError) as caught:
        answer = call()
        if isinstance(answer, Iterable):
            first = next(iter(answer))
            raise AssertionError(f"a message came before the refusal: {first}")
    err = caught.value
    status = rpc_status.from_call(err)
    assert status is not None, err
    failure = error_details_pb2.PreconditionFailure()
    violations = [(v.type, v.subject) for d in status.details[1:] if d.Unpack(failure) for v in failure.violations]
    return (*error_info(err), violations)


def rid() -> str:
    return uuid.uuid4().hex


def v1_reflection(channel: grpc.Channel, *requests: dict[str, str]) -> list[Any]:
    """Ask reflection in its v1 protocol, with messages built from the v1 package's names (the v1alpha
    file renamed, as grpc's v1 reflection.proto is)."""
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    proto = text_format.Parse(text_format.MessageToString(alpha).replace("grpc.reflection.v1alpha",
                                                                          "grpc.reflection.v1"),
                              descriptor_pb2.FileDescriptorProto())
    proto.name = "grpc/reflection/v1/reflection.proto"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    request, response = (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
                         for n in ("ServerReflectionRequest", "ServerReflectionResponse"))
    call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=request.SerializeToString,
                                 response_deserializer=response.FromString)
    return list(call(iter([request(**r) for r in requests]), timeout=30))


def test_reflection_v1_lists_the_service_and_reaches_the_error_details(agent: Agent) -> None:
    with agent.channel() as ch:
        services, error_info, agent_file = v1_reflection(
            ch, {"list_services": ""}, {"file_containing_symbol": "google.rpc.ErrorInfo"},
            {"file_containing_symbol": "domsnap.v1.SnapshotAgent"})
    assert {"domsnap.v1.SnapshotAgent", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= {s.name for s in services.list_services_response.service}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in error_info.file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "google/rpc/error_details.proto" and "ErrorInfo" in [m.name for m in f.message_type]
               for f in files)
    domsnap = next(descriptor_pb2.FileDescriptorProto.FromString(b)
                   for b in agent_file.file_descriptor_response.file_descriptor_proto)
    assert {"google/rpc/error_details.proto", "google/api/field_behavior.proto"} <= set(domsnap.dependency)


def test_refusals_without_a_guest(agent: Agent) -> None:
    stub = agent.stub()
    assert refusal(lambda: stub.GetDomain(pb.GetDomainRequest(), timeout=30)) == (
        "INVALID_ARGUMENT", "FIELD_REQUIRED", {"field": "domain"}, [])
    assert refusal(lambda: stub.GetDomain(pb.GetDomainRequest(domain_name=""), timeout=30)) == (
        "INVALID_ARGUMENT", "INVALID_NAME", {"field": "domain"}, [])
    assert refusal(lambda: stub.GetDomain(pb.GetDomainRequest(domain_name="nosuch"), timeout=30)) == (
        "NOT_FOUND", "DOMAIN_NOT_FOUND", {"domain": "nosuch"}, [])
    assert refusal(lambda: stub.GetDomain(pb.GetDomainRequest(domain_uid="u1"), timeout=30)) == (
        "NOT_FOUND", "DOMAIN_NOT_FOUND", {"domain_uid": "u1"}, [])
    assert refusal(lambda: stub.WatchOperation(pb.WatchOperationRequest(operation_id="op9"), timeout=30)) == (
        "NOT_FOUND", "OPERATION_NOT_FOUND", {"operation_id": "op9"}, [])
    assert refusal(lambda: stub.CancelOperation(pb.CancelOperationRequest(), timeout=30))[1:3] == (
        "FIELD_REQUIRED", {"field": "operation_id"})
    assert refusal(lambda: stub.ListSnapshots(pb.ListSnapshotsRequest(page_token="x"), timeout=30))[:3] == (
        "INVALID_ARGUMENT", "INVALID_PAGE_TOKEN", {"field": "page_token"})
    assert refusal(lambda: stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name="nosuch", request_id=rid()),
                                               timeout=30))[:2] == ("NOT_FOUND", "DOMAIN_NOT_FOUND")
    assert refusal(lambda: stub.CreateDomain(pb.CreateDomainRequest(request_id=rid()), timeout=30))[:3] == (
        "INVALID_ARGUMENT", "FIELD_REQUIRED", {"field": "config"})
    code, reason, meta, _ = refusal(lambda: stub.CreateDomain(pb.CreateDomainRequest(
        request_id=rid(), config='name = "a"\nmemory = = 1\n', config_name="a.cfg"), timeout=30))
    assert (code, reason, meta) == ("INVALID_ARGUMENT", "INVALID_CONFIG", {"source": "a.cfg", "line": "2",
                                                                           "column": "10"})
    assert refusal(lambda: stub.GetSnapshot(pb.GetSnapshotRequest(domain_name="nosuch", snapshot_path="rel/x"),
                                            timeout=30))[:2] == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert refusal(lambda: stub.GetDomain(pb.GetDomainRequest(domain_name="x" * 300), timeout=30)) == (
        "INVALID_ARGUMENT", "FIELD_TOO_LONG", {"field": "domain_name"}, [])
    assert refusal(lambda: stub.GetSnapshot(pb.GetSnapshotRequest(domain_name="d", snapshot_uid="u" * 300),
                                            timeout=30)) == (
        "INVALID_ARGUMENT", "FIELD_TOO_LONG", {"field": "snapshot_uid"}, [])
    assert refusal(lambda: stub.WatchEvents(pb.WatchEventsRequest(since="garbage"), timeout=30)) == (
        "INVALID_ARGUMENT", "INVALID_EVENT_TOKEN", {"field": "since"}, [])
    assert refusal(lambda: stub.WatchEvents(pb.WatchEventsRequest(since="0123456789ab-1"), timeout=30)) == (
        "OUT_OF_RANGE", "EVENTS_EXPIRED", {"since": "0123456789ab-1"}, [])


def test_identities_views_pages_and_refusals_on_a_guest(agent: Agent, boot_guest: BootGuest) -> None:
    g, other = boot_guest("qcow2"), boot_guest("qcow2")
    stub = agent.stub()
    d = g.domain()
    uuid.UUID(d.uid)
    assert d.resource_name == f"domains/{g.name}" and d.config and d.disks
    assert stub.GetDomain(pb.GetDomainRequest(domain_uid=d.uid), timeout=30).name == g.name
    assert stub.GetDomain(pb.GetDomainRequest(domid=d.domid), timeout=30).uid == d.uid

    # Lists: BASIC unless asked, paged by name.
    basic = {x.name: x for x in stub.ListDomains(pb.ListDomainsRequest(), timeout=30).domains}
    assert basic[g.name].uid == d.uid and not basic[g.name].config and not basic[g.name].disks
    full = {x.name: x for x in stub.ListDomains(pb.ListDomainsRequest(view=pb.VIEW_FULL), timeout=30).domains}
    assert full[g.name].config == d.config
    names, token = [], ""
    while True:
        page = stub.ListDomains(pb.ListDomainsRequest(page_size=1, page_token=token), timeout=30)
        assert len(page.domains) <= 1
        names += [x.name for x in page.domains]
        if not (token := page.next_page_token):
            break
    assert names == sorted(basic)

    # Nameless creates one after the other both succeed (within one second:
    # tests/unit/test_api_identity.py, where a create takes milliseconds).
    made = [g.create_snapshot()[-1].finished.result for _ in range(2)]
    assert all(s.name for s in made) and made[0].name != made[1].name, made
    snap = made[0]
    uuid.UUID(snap.uid)
    assert (snap.resource_name, snap.domain_uid) == (f"domains/{g.name}/snapshots/{snap.name}", d.uid)
    listed = stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots
    assert [s.uid for s in listed] == [s.uid for s in made] and not any(s.disks for s in listed)
    assert all(s.disks for s in stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name, view=pb.VIEW_FULL),
                                                   timeout=30).snapshots)
    ops = stub.ListOperations(pb.ListOperationsRequest(domain_name=g.name), timeout=30).operations
    assert [o.result.uid for o in ops] == [s.uid for s in reversed(made)] and not any(o.result.disks for o in ops)
    assert all(o.result.disks for o in stub.ListOperations(pb.ListOperationsRequest(domain_name=g.name,
                                                                                   view=pb.VIEW_FULL),
                                                           timeout=30).operations)

    # A snapshot named by its uid: of the domain named with it only.
    by_uid = stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_uid=snap.uid), timeout=30)
    assert (by_uid.name, by_uid.uid) == (snap.name, snap.uid)
    assert refusal(lambda: stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_uid="u9"),
                                            timeout=30)) == (
        "NOT_FOUND", "SNAPSHOT_NOT_FOUND", {"snapshot_uid": "u9"}, [])
    assert refusal(lambda: stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=other.name, snapshot_uid=snap.uid),
                                            timeout=30)) == (
        "NOT_FOUND", "SNAPSHOT_NOT_FOUND", {"domain": other.name, "path": snap.path}, [])
    edited = stub.EditSnapshot(pb.EditSnapshotRequest(domain_name=g.name, snapshot_uid=made[1].uid,
                                                      description="by uid", request_id=rid()), timeout=30)
    assert (edited.name, edited.description) == (made[1].name, "by uid")
    # An internal qcow2 snapshot's tag holds its name.
    assert refusal(lambda: stub.EditSnapshot(pb.EditSnapshotRequest(
        domain_name=g.name, snapshot_uid=made[1].uid, new_name="renamed", request_id=rid()), timeout=30)) == (
        "FAILED_PRECONDITION", "FAILED_PRECONDITION", {"domain": g.name, "snapshot": made[1].name}, [])
    deleted = list(stub.DeleteSnapshot(pb.DeleteSnapshotRequest(domain_name=g.name, snapshot_uid=made[1].uid,
                                                                request_id=rid()), timeout=60))
    assert list(deleted[-1].finished.deleted) == [made[1].name]
    assert refusal(lambda: stub.DeleteSnapshot(pb.DeleteSnapshotRequest(
        domain_name=g.name, snapshot_uid=made[1].uid, request_id=rid()), timeout=60))[:3] == (
        "NOT_FOUND", "SNAPSHOT_NOT_FOUND", {"snapshot_uid": made[1].uid})

    assert refusal(lambda: stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="nosuch"),
                                            timeout=30)) == (
        "NOT_FOUND", "SNAPSHOT_NOT_FOUND", {"domain": g.name, "snapshot": "nosuch"}, [])
    assert refusal(lambda: g.create_snapshot(name=snap.name)) == (
        "ALREADY_EXISTS", "SNAPSHOT_EXISTS", {"domain": g.name, "snapshot": snap.name}, [])
    assert refusal(lambda: g.create_snapshot(name="out", path="/nowhere/out"))[:3] == (
        "INVALID_ARGUMENT", "PATH_NOT_ALLOWED", {"path": "/nowhere/out"})

    # The same request id with another request.
    stub.PauseDomain(pb.PauseDomainRequest(domain_name=other.name, request_id="pause-1"), timeout=30)
    assert refusal(lambda: stub.PauseDomain(pb.PauseDomainRequest(domain_name=g.name, request_id="pause-1"),
                                            timeout=30)) == (
        "INVALID_ARGUMENT", "REQUEST_ID_REUSED", {"request_id": "pause-1"}, [])

    # A busy domain names the operation it is busy with.
    stream = stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=g.name, name="long", live=True,
                                                          request_id=rid()), timeout=300)
    started = next(iter(stream)).started
    assert refusal(lambda: g.create_snapshot(name="second")) == (
        "ABORTED", "DOMAIN_BUSY", {"domain": g.name, "operation_id": started.id}, [])
    assert list(stream)[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED

    # A destroyed domain is answered shut down; a revert of it is risky (the
    # domain is gone): refused with each risk a violation; forced, the domain
    # comes back with the uid it had.
    gone = stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=g.name, request_id=rid()), timeout=60)
    assert (gone.name, gone.state, gone.domid) == (g.name, pb.DOMAIN_STATE_SHUTDOWN, 0)
    assert refusal(lambda: g.revert(snap.name)) == (
        "FAILED_PRECONDITION", "REVERT_RISKY", {"domain": g.name, "snapshot": snap.name},
        [("DOMAIN_GONE", f"domains/{g.name}")])
    plan = next(iter(stub.RevertSnapshot(pb.RevertSnapshotRequest(domain_name=g.name, snapshot_name=snap.name,
                                                                  dry_run=True), timeout=60))).plan
    assert [r.type for r in plan.risks] == ["DOMAIN_GONE"]
    reverted = list(stub.RevertSnapshot(pb.RevertSnapshotRequest(domain_name=g.name, snapshot_uid=snap.uid,
                                                                 force=True, request_id=rid()), timeout=300))
    assert (reverted[-1].finished.state, reverted[-1].finished.snapshot) == (pb.OPERATION_STATE_SUCCEEDED, snap.name)
    assert g.domain().uid == d.uid
