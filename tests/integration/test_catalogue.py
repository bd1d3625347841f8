"""Issue 5 on real guests: chain-aware delete, cancel, re-attach, idempotent
retries, a full disk, parallel operations and a bounded load."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from testbed import guestprobe
from testbed.harness import Agent
from tests.integration.conftest import BootGuest, Guest, destroy_all, error_info, start_guest

pytestmark = [pytest.mark.guest]


def chain(image: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
                         capture_output=True, text=True, check=True)
    return [d["filename"] for d in json.loads(out.stdout)]


def snapshots(agent: Agent, domain: str) -> dict[str, pb.Snapshot]:
    resp = agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=domain, view=pb.VIEW_FULL), timeout=30)
    return {s.name: s for s in resp.snapshots}


def delete(agent: Agent, domain: str, name: str, children: bool = False) -> list[pb.OperationEvent]:
    return list(agent.stub().DeleteSnapshot(pb.DeleteSnapshotRequest(
        domain_name=domain, snapshot_name=name, children=children, request_id=uuid.uuid4().hex), timeout=120))


def assert_reverts(g: Guest, name: str) -> None:
    """Revert to `name`; the guest goes on from that snapshot with its disk agreeing."""
    mark = g.mark()
    g.revert(name)
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=mark)
    assert not guestprobe.mismatches(g.serial, mark)


@pytest.mark.slow
def test_delete_in_every_chain_position(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    base = str(g.disks["xvda"][0])
    for name in ("s1", "s2", "s3"):
        g.create_snapshot(name=name, method=pb.SNAPSHOT_METHOD_EXTERNAL)
    snaps = snapshots(agent, g.name)
    assert [snaps[n].parent for n in ("s1", "s2", "s3")] == ["", "s1", "s2"]
    top = g.domain().disks[0].target
    assert chain(top) == [snaps["s3"].disks[0].file, snaps["s2"].disks[0].file, snaps["s1"].disks[0].file, base]

    # The middle one: its layer merges into the image below (s1's overlay), on
    # which s3 is then frozen; the chain is one image shorter; s3's parent becomes s1.
    s2 = snaps["s2"]
    delete(agent, g.name, "s2")
    snaps = snapshots(agent, g.name)
    assert set(snaps) == {"s1", "s3"} and snaps["s3"].parent == "s1"
    assert not Path(s2.memory.path).exists() and not (Path(s2.path) / "snapshot.json").exists()
    assert snaps["s3"].disks[0].image == s2.disks[0].image == snaps["s1"].disks[0].file
    assert chain(g.domain().disks[0].target) == [snaps["s3"].disks[0].file, snaps["s1"].disks[0].file, base]

    # The current one: the domain runs on its layer, which merges live into the
    # image below (the domain then runs on that); current moves to its parent.
    s3 = snaps["s3"]
    delete(agent, g.name, "s3")
    snaps = snapshots(agent, g.name)
    assert set(snaps) == {"s1"} and snaps["s1"].current
    assert not Path(s3.disks[0].file).exists() and g.domain().disks[0].target == s3.disks[0].image
    assert chain(g.domain().disks[0].target) == [snaps["s1"].disks[0].file, base]
    assert_reverts(g, "s1")

    # The first one, with a child taken after the revert: --children removes both.
    g.create_snapshot(name="s4", method=pb.SNAPSHOT_METHOD_EXTERNAL)
    assert snapshots(agent, g.name)["s4"].parent == "s1"
    delete(agent, g.name, "s1", children=True)
    assert snapshots(agent, g.name) == {}
    top = g.domain().disks[0].target
    assert all(Path(f).exists() for f in chain(top)), "a file of the domain's own chain was deleted"
    assert Path(base).exists()
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=g.mark())


def test_delete_internal_removes_tag_and_directory(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", "raw")
    g.create_snapshot(name="i1")
    snap = snapshots(agent, g.name)["i1"]
    events = delete(agent, g.name, "i1")
    assert events[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED
    assert not Path(snap.path).exists()
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(g.disks["xvda"][0])],
                                     capture_output=True, text=True, check=True).stdout)
    assert "i1" not in [s["name"] for s in info.get("snapshots", [])]
    out = agent.cli("snapshot-delete", g.name, "i1")
    assert out.returncode == 1 and "no snapshot named 'i1'" in out.stderr


@pytest.fixture
def slow_guest(slow_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[Guest]:
    g = start_guest(slow_agent, guest_image, tmp_path, "qcow2", "raw")
    yield g
    destroy_all(slow_agent, [g])


def started(stream: Iterator[pb.OperationEvent]) -> str:
    first = next(stream)
    assert first.WhichOneof("event") == "started"
    return first.started.id


def test_cancel_mid_memory_rolls_back(slow_agent: Agent, slow_guest: Guest) -> None:
    g = slow_guest
    stub = slow_agent.stub()
    stream = stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=g.name, name="c1", request_id=uuid.uuid4().hex),
                                 timeout=120)
    op_id = started(stream)
    for ev in stream:
        if ev.WhichOneof("event") == "progress" and ev.progress.phase == pb.PHASE_MEMORY and ev.progress.bytes_done:
            break
    op = stub.CancelOperation(pb.CancelOperationRequest(operation_id=op_id), timeout=30)
    assert op.state in (pb.OPERATION_STATE_CANCELLING, pb.OPERATION_STATE_CANCELLED)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    final = stub.ListOperations(pb.ListOperationsRequest(domain_name=g.name), timeout=30).operations[0]
    assert (final.id, final.state) == (op_id, pb.OPERATION_STATE_CANCELLED)
    assert "c1" not in snapshots(slow_agent, g.name)
    assert not (slow_agent.snapshot_root / g.name / "c1").exists()
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=g.mark())
    with pytest.raises(grpc.RpcError) as err:
        stub.CancelOperation(pb.CancelOperationRequest(operation_id=op_id), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_dropped_client_reattaches_and_retry_is_idempotent(slow_agent: Agent, slow_guest: Guest) -> None:
    g = slow_guest
    request_id = uuid.uuid4().hex
    req = pb.CreateSnapshotRequest(domain_name=g.name, name="w1", request_id=request_id)
    with slow_agent.channel() as ch:
        stream = pb_grpc.SnapshotAgentStub(ch).CreateSnapshot(req, timeout=120)
        op_id = started(stream)
        stream.cancel()  # the client goes away; the operation must not
    # The same request again: the same operation, not a second snapshot.
    again = slow_agent.stub().CreateSnapshot(req, timeout=120)
    assert started(again) == op_id
    events = list(slow_agent.stub().WatchOperation(pb.WatchOperationRequest(operation_id=op_id), timeout=120))
    assert events[0].started.id == op_id
    assert events[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED
    assert events[-1].finished.result.name == "w1"
    assert [s for s in snapshots(slow_agent, g.name)] == ["w1"]
    out = slow_agent.cli("watch", op_id)
    assert out.returncode == 0, out.stderr



@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 100 MiB tmpfs: room for some things, not for everything."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    # mode=0755: a world-writable snapshot directory is refused (anyone could swap files in it).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m,mode=0755", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_is_resource_exhausted_and_leaves_nothing(agent: Agent, boot_guest: BootGuest,
                                                            small_fs: Path) -> None:
    g = boot_guest("qcow2", "raw")
    # Refused up front: a 128 MiB guest's memory image may need 128 MiB.
    with pytest.raises(grpc.RpcError) as err:
        g.create_snapshot(name="full1", path=str(small_fs / "full1"))
    assert error_info(err.value) == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_SPACE", {"path": str(small_fs)})
    assert list(small_fs.iterdir()) == []

    # Full while writing: another writer takes the space once validation passed.
    big = boot_guest("qcow2", memory=96)
    filler = small_fs / "filler"
    target = small_fs / "full2"

    def fill_when_started() -> None:
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        with open(filler, "wb") as f:
            while True:
                try:
                    f.write(b"x" * (1 << 20))
                except OSError:
                    return

    t = threading.Thread(target=fill_when_started)
    t.start()
    with pytest.raises(grpc.RpcError) as err:
        big.create_snapshot(name="full2", path=str(target))
    t.join()
    assert error_info(err.value)[:2] == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_SPACE"), err.value.details()
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
    assert big.domain().state == pb.DOMAIN_STATE_RUNNING
    assert "full2" not in snapshots(agent, big.name)
    guestprobe.wait_disk_ok(big.serial, "vda", timeout=20, offset=big.mark())


def test_operations_on_two_domains_run_in_parallel(agent: Agent, boot_guest: BootGuest) -> None:
    a, b = boot_guest("qcow2"), boot_guest("qcow2")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda g: g.create_snapshot(name="par", live=True), (a, b)))
    assert all(r[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED for r in results)


def test_hundred_clients_list_and_watch_while_a_create_runs(slow_agent: Agent, slow_guest: Guest) -> None:
    stub = slow_agent.stub()
    stream = stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=slow_guest.name, name="load",
                                                          request_id=uuid.uuid4().hex), timeout=120)
    op_id = started(stream)

    def client(i: int) -> str:
        with slow_agent.channel() as ch:
            s = pb_grpc.SnapshotAgentStub(ch)
            if i % 2:
                events = list(s.WatchOperation(pb.WatchOperationRequest(operation_id=op_id), timeout=120))
                return events[-1].WhichOneof("event") or ""
            s.ListDomains(pb.ListDomainsRequest(), timeout=30)
            s.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30)
            return "listed"

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(client, range(100)))
    assert answers.count("finished") == 50 and answers.count("listed") == 50
    list(stream)
    assert "load" in snapshots(slow_agent, slow_guest.name)
    assert slow_agent.proc is not None and slow_agent.proc.poll() is None
