"""The refusals domsnap.proto lists that the other wire tests do not reach,
each against a real agent and guest: its code, AIP-193 reason and metadata.
(The rest: test_api_contract, test_catalogue (INSUFFICIENT_SPACE),
test_quiesce, test_recovery, test_security, test_node_example.)"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent, guest_config
from tests.integration.conftest import BootGuest, Guest, error_info

pytestmark = pytest.mark.guest


def refused(call: Callable[[], Any]) -> tuple[str, str, dict[str, str]]:
    """A call that must fail (a stream before its first message): its code, reason and metadata."""
    with pytest.raises(grpc.RpcError) as caught:
        answer = call()
        if isinstance(answer, Iterator):
            raise AssertionError(f"a message came before the refusal: {next(answer)}")
    return error_info(caught.value)


def create(g: Guest, **fields: Any) -> Callable[[], Any]:
    return lambda: g.agent.stub().CreateSnapshot(pb.CreateSnapshotRequest(
        domain_name=g.name, request_id=uuid.uuid4().hex, **fields), timeout=60)


def config(g: Guest, name: str = "") -> str:
    """The guest's cfg text, under another name if given."""
    return (g.folder / "guest.cfg").read_text().replace(f'name = "{g.name}"', f'name = "{name or g.name}"')


def test_refusals_on_a_guest(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2", "raw", wait=False)
    stub = agent.stub()
    existing = tmp_path / "taken"
    existing.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "snapshot.json").write_text("{")
    cases: list[tuple[str, Callable[[], Any], tuple[str, str, dict[str, str]]]] = [
        ("a method the raw disk cannot do", create(g, method=pb.SNAPSHOT_METHOD_INTERNAL, dry_run=True),
         ("INVALID_ARGUMENT", "METHOD_UNSUPPORTED", {"vdev": "xvdb"})),
        ("a snapshot folder that exists", create(g, path=str(existing), dry_run=True),
         ("ALREADY_EXISTS", "PATH_EXISTS", {"path": str(existing)})),
        ("a domain that runs", lambda: stub.CreateDomain(pb.CreateDomainRequest(config=config(g)), timeout=60),
         ("ALREADY_EXISTS", "DOMAIN_EXISTS", {"domain": g.name})),
        ("a manifest that is not one", lambda: stub.GetSnapshot(pb.GetSnapshotRequest(
            domain_name=g.name, snapshot_path=str(broken)), timeout=30),
         ("FAILED_PRECONDITION", "MANIFEST_INVALID", {"path": str(broken / "snapshot.json")})),
    ]
    for what, call, expected in cases:
        assert refused(call) == expected, what
    assert not any((agent.snapshot_root / g.name).glob("*")), "a refusal left something behind"

    # A snapshot's file gone behind the agent's back (the raw disk's copy).
    snap = g.create_snapshot(name="s")[-1].finished.result
    [copy] = [d.file for d in snap.disks if d.vdev == "xvdb"]
    os.unlink(copy)
    assert refused(lambda: stub.RevertSnapshot(pb.RevertSnapshotRequest(domain_name=g.name, snapshot_name="s",
                                                                        dry_run=True), timeout=60)) == (
        "NOT_FOUND", "NOT_FOUND", {"vdev": "xvdb", "file": copy})


def test_refusals_around_operations(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", wait=False)
    stub = agent.stub()
    assert g.create_snapshot(name="ext", method=pb.SNAPSHOT_METHOD_EXTERNAL)[-1].finished.state == (
        pb.OPERATION_STATE_SUCCEEDED)
    # The guest's first image holds the snapshot now: a second domain on it is refused.
    image = str(g.disks["xvda"][0])
    assert refused(lambda: stub.CreateDomain(pb.CreateDomainRequest(config=config(g, g.name + "b")), timeout=60)) == (
        "FAILED_PRECONDITION", "FROZEN_LAYER", {"domain": g.name, "snapshot": "ext", "vdev": "xvda", "path": image})

    # A cancel once the revert has destroyed the domain is too late.
    stream = stub.RevertSnapshot(pb.RevertSnapshotRequest(domain_name=g.name, snapshot_name="ext",
                                                          request_id=uuid.uuid4().hex), timeout=300)
    op = next(stream).started
    phase = next(ev.progress.phase for ev in stream if ev.progress.phase >= pb.PHASE_DESTROY)
    assert refused(lambda: stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id), timeout=30)) == (
        "FAILED_PRECONDITION", "PAST_NO_RETURN", {"operation_id": op.id}), pb.Phase.Name(phase)
    assert list(stream)[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED

    # QEMU gone behind the agent's back.
    qemu = int((agent.state_dir / "qemu" / g.name / "qemu.pid").read_text())
    os.kill(qemu, signal.SIGKILL)
    assert refused(lambda: stub.PauseDomain(pb.PauseDomainRequest(domain_name=g.name), timeout=60)) == (
        "UNAVAILABLE", "HYPERVISOR_UNAVAILABLE", {"domain": g.name})


def test_refusals_of_disks(agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> None:
    """A disk no storage backend takes, and one QEMU cannot open."""
    stub = agent.stub()
    qed, garbage = tmp_path / "q.qed", tmp_path / "garbage.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(qed), "32M"], check=True, timeout=60)
    garbage.write_bytes(b"QFI\xfb" + bytes(4096))
    name = f"t{uuid.uuid4().hex[:8]}"
    stub.CreateDomain(pb.CreateDomainRequest(config=guest_config(
        name, *guest_image, {"xvda": (qed, "qed")}, tmp_path / "qed.log")), timeout=60)
    try:
        assert refused(lambda: stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=name, dry_run=True),
                                                   timeout=60)) == (
            "INVALID_ARGUMENT", "FORMAT_UNSUPPORTED", {"vdev": "xvda"})
    finally:
        stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=name), timeout=60)
    assert refused(lambda: stub.CreateDomain(pb.CreateDomainRequest(config=guest_config(
        name, *guest_image, {"xvda": (garbage, "qcow2")}, tmp_path / "garbage.log")), timeout=60)) == (
        "INTERNAL", "COMMAND_FAILED", {"command": "qemu-system-x86_64"})


def test_refusals_of_a_group_member(agent: Agent) -> None:
    """A member's call starts with PREPARE: no command is a required field missing, another one refused."""
    stub = agent.stub()

    def member(first: pb.GroupSnapshotRequest) -> Callable[[], Any]:
        return lambda: stub.GroupSnapshot(iter([first]), timeout=30)

    assert refused(member(pb.GroupSnapshotRequest())) == ("INVALID_ARGUMENT", "FIELD_REQUIRED", {"field": "command"})
    assert refused(member(pb.GroupSnapshotRequest(command=pb.GROUP_COMMAND_FREEZE))) == (
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", {})
