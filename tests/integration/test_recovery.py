"""The agent killed (SIGKILL) at every journaled step of create, revert and
delete, then restarted: it must roll back or finish, and the promises of
docs/design.md must hold on the real guest and on disk. The same matrix runs
in seconds, without guests, in tests/unit/test_core_recovery.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from domsnap.agent.journal import FAIL_ENV, KILL_ENV
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk
from tests.integration.conftest import Guest, error_info, own_agent, start_guest

pytestmark = [pytest.mark.guest, pytest.mark.slow]

CREATE_STEPS = ["mkdir", "checkpoint", "disk:xvda", "disk:xvdb", "copy:xvda", "copy:xvdb", "manifest", "register"]
REVERT_STEPS = ["destroy", "disk:xvda", "disk:xvdb", "restore", "restored"]


@pytest.fixture(scope="module")
def fault_agent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    with own_agent(tmp_path_factory.mktemp("fault"), accel, tables="[testing]\nfault_injection = true\n") as a:
        yield a


Call = pb.CreateSnapshotRequest | pb.RevertSnapshotRequest | pb.DeleteSnapshotRequest


def run_until_killed(agent: Agent, step: str, call: Call) -> None:
    """Arm the kill at `step`, make the call, see the agent die, start it again (recovery runs)."""
    agent.env[KILL_ENV] = step
    agent.restart()
    stub = agent.stub()
    with pytest.raises(grpc.RpcError):
        if isinstance(call, pb.CreateSnapshotRequest):
            list(stub.CreateSnapshot(call, timeout=120))
        elif isinstance(call, pb.RevertSnapshotRequest):
            list(stub.RevertSnapshot(call, timeout=120))
        else:
            list(stub.DeleteSnapshot(call, timeout=120))
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == -9, f"the agent did not die at {step}"
    agent.proc = None
    del agent.env[KILL_ENV]
    agent.start()


def tags(image: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True,
                         check=True)
    return [s["name"] for s in json.loads(out.stdout).get("snapshots", [])]


def assert_running_and_consistent(g: Guest, since: int) -> None:
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    start = guestprobe.last_counter(g.serial) or 0
    guestprobe.wait_counter_above(g.serial, start + 3, timeout=20)
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=since)
    assert not guestprobe.mismatches(g.serial, since), "the guest saw a disk that does not match its memory"


def counter_after_rewind(lines: list[str]) -> int | None:
    """The first counter printed after the counter went backwards (a revert)."""
    values = [int(line[2:]) for line in lines if line.startswith("C ")]
    return next((v for prev, v in itertools.pairwise(values) if v < prev), None)


@pytest.mark.parametrize(("live", "method"), [(False, pb.SNAPSHOT_METHOD_UNSPECIFIED), (True,
                                                                                        pb.SNAPSHOT_METHOD_EXTERNAL)])
def test_create_killed_at_every_step(fault_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path,
                                     live: bool, method: pb.SnapshotMethod.ValueType) -> None:
    """xvda is qcow2 (internal by default, or an external overlay), xvdb raw (a copy)."""
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2", "raw")
    root = fault_agent.snapshot_root / g.name
    xvda = g.disks["xvda"][0]
    for step in CREATE_STEPS:
        name = f"k-{step.replace(':', '-')}-{int(live)}"
        before = g.domain()
        mark = g.mark()
        req = pb.CreateSnapshotRequest(domain_name=g.name, name=name, live=live, method=method,
                                       request_id=uuid.uuid4().hex)
        run_until_killed(fault_agent, f"create:{step}", req)

        listed = [s.name for s in fault_agent.stub().ListSnapshots(
            pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        after = g.domain()
        if step == "register":  # the manifest was written: the snapshot is complete and kept
            assert name in listed
            snap = fault_agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name=name),
                                                  timeout=30)
            assert snap.current and snap.memory.size_bytes > 0
            assert (root / name / "snapshot.json").is_file()
        else:  # rolled back: no trace anywhere
            assert name not in listed, step
            assert not (root / name).exists(), f"{step}: snapshot directory left behind"
            assert name not in tags(xvda), f"{step}: qcow2 tag left behind"
            assert [d.target for d in after.disks] == [d.target for d in before.disks], (
                f"{step}: the domain did not go back to its own disks")
        assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"
        assert_running_and_consistent(g, mark)


def test_revert_killed_at_every_step(fault_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> None:
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2", "raw")
    c_before = g.counter()
    g.create_snapshot(name="base")
    c_after = g.counter()
    for step in REVERT_STEPS:
        guestprobe.wait_counter_above(g.serial, c_after + 20, timeout=20)
        mark = g.mark()
        run_until_killed(fault_agent, f"revert:{step}", pb.RevertSnapshotRequest(
            domain_name=g.name, snapshot_name="base", request_id=uuid.uuid4().hex))
        # Past its point of no return a revert is finished by the next agent.
        d = g.domain()
        assert d.state == pb.DOMAIN_STATE_RUNNING, step
        first = guestprobe.wait_for(g.serial, counter_after_rewind, timeout=20, offset=mark,
                                    what="the counter going back to the snapshot's")
        assert c_before + 1 <= first <= c_after + 1, f"{step}: the guest went on from {first}"
        snap = fault_agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="base"),
                                              timeout=30)
        assert snap.current
        assert_running_and_consistent(g, mark)


DELETE_STEPS = ["unregister", "disks", "merge", "files"]


def test_delete_killed_at_every_step(fault_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> None:
    """A delete past its point of no return is finished by the next agent; the
    snapshots it did not delete stay intact and revertable."""
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2", "raw")
    xvda = g.disks["xvda"][0]
    g.create_snapshot(name="keep")
    for step in DELETE_STEPS:
        name = f"d-{step}"
        g.create_snapshot(name=name)
        snapdir = fault_agent.snapshot_root / g.name / name
        assert name in tags(xvda) and snapdir.is_dir()
        run_until_killed(fault_agent, f"delete:{step}", pb.DeleteSnapshotRequest(
            domain_name=g.name, snapshot_name=name, request_id=uuid.uuid4().hex))
        listed = [s.name for s in fault_agent.stub().ListSnapshots(
            pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        assert name not in listed, step
        assert name not in tags(xvda), f"{step}: tag left behind"
        assert not snapdir.exists(), f"{step}: {sorted(p.name for p in snapdir.iterdir())} left behind"
        assert "keep" in listed and "keep" in tags(xvda)
        assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"
    mark = g.mark()
    g.revert("keep")
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=mark)
    assert not guestprobe.mismatches(g.serial, mark)


def restart_with(agent: Agent, fail_at: str | None) -> None:
    if fail_at is None:
        agent.env.pop(FAIL_ENV, None)
    else:
        agent.env[FAIL_ENV] = fail_at
    agent.restart()


def test_a_revert_failing_after_destroy_is_retried_listed_and_finished(
        fault_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> None:
    """The domain is gone once a revert destroyed it: a failure after that is
    retried at once; failing twice, the domain is listed with the reason, and a
    repeated revert, or the next agent, finishes it."""
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2", "raw")
    c_before = g.counter()
    g.create_snapshot(name="base")
    c_after = g.counter()
    g.create_snapshot(name="other")
    try:
        def reverted(mark: int) -> None:
            first = guestprobe.wait_for(g.serial, counter_after_rewind, timeout=20, offset=mark,
                                        what="the counter going back to the snapshot's")
            assert c_before + 1 <= first <= c_after + 1
            assert_running_and_consistent(g, mark)
            assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"
            assert not g.domain().problem

        def mark_before_revert() -> int:
            # Counters above the snapshot's after the mark: the revert shows as the counter going back.
            mark = g.mark()
            guestprobe.wait_counter_above(g.serial, max(c_after + 20, g.counter() + 3), timeout=20)
            return mark

        # Fails once: the retry from the journal brings the domain back in the same call.
        restart_with(fault_agent, "revert:restore:1")
        mark = mark_before_revert()
        g.revert("base")
        reverted(mark)

        # Fails twice: stranded, listed with the reason; a revert elsewhere is refused; the same one finishes it.
        restart_with(fault_agent, "revert:restore:2")
        mark = mark_before_revert()
        with pytest.raises(grpc.RpcError) as err:
            g.revert("base")
        assert "it was tried twice; snapshot-revert" in (err.value.details() or "")
        listed = {d.name: d for d in fault_agent.stub().ListDomains(pb.ListDomainsRequest(), timeout=30).domains}
        assert listed[g.name].state == pb.DOMAIN_STATE_SHUTDOWN
        assert listed[g.name].problem.startswith("the revert to base failed after the domain was destroyed: "
                                                 "fault injection")
        out = fault_agent.cli("list", check=True)
        assert f"{g.name}: the revert to base failed after the domain was destroyed" in out.stdout
        with pytest.raises(grpc.RpcError) as err:
            g.revert("other")
        assert error_info(err.value) == ("FAILED_PRECONDITION", "DOMAIN_STRANDED",
                                         {"domain": g.name, "snapshot": "base"})
        assert f"snapshot-revert {g.name} base finishes that first" in (err.value.details() or "")
        g.revert("base")
        reverted(mark)

        # Stranded, then the agent restarts: its recovery finishes the revert.
        restart_with(fault_agent, "revert:restore:2")
        mark = mark_before_revert()
        with pytest.raises(grpc.RpcError):
            g.revert("base")
        assert g.domain().state == pb.DOMAIN_STATE_SHUTDOWN
        restart_with(fault_agent, None)
        reverted(mark)
    finally:
        restart_with(fault_agent, None)


def test_a_paused_domain_killed_while_relaunched_comes_back(fault_agent: Agent, guest_image: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    """A snapshot of a paused domain ends with its QEMU restarted from the
    memory image just written; killed before the old QEMU stops or before the
    new one has loaded the image, the next agent relaunches the domain from
    that image, paused, before it rolls the snapshot back."""
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2")
    xvda = g.disks["xvda"][0]
    for step in ("repark", "relaunch"):
        name = f"p-{step}"
        fault_agent.cli("pause", g.name, check=True)
        paused_at = g.counter()
        domid = g.domain().domid
        run_until_killed(fault_agent, f"create:{step}", pb.CreateSnapshotRequest(
            domain_name=g.name, name=name, request_id=uuid.uuid4().hex))
        d = g.domain()
        assert (d.state, d.domid) == (pb.DOMAIN_STATE_PAUSED, domid), step
        listed = [s.name for s in fault_agent.stub().ListSnapshots(
            pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        assert name not in listed and name not in tags(xvda), step
        assert not (fault_agent.snapshot_root / g.name / name).exists()
        assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"
        assert "relaunching it" in fault_agent.log.read_text()
        # The killed agent's operation is listed by the next one, with its outcome.
        ops = {o.snapshot: o for o in fault_agent.stub().ListOperations(pb.ListOperationsRequest(), timeout=30)
               .operations}
        assert ops[name].state == pb.OPERATION_STATE_FAILED
        assert ops[name].error.message == ("the agent stopped during this operation; the agent started after it: "
                                           "rolled back")
        mark = g.mark()
        fault_agent.cli("unpause", g.name, check=True)
        # It goes on from where it was paused: its memory came back whole.
        first = guestprobe.wait_for(g.serial, lambda lines: next(
            (int(x[2:]) for x in lines if x.startswith("C ")), None), timeout=20, offset=mark, what="a counter")
        assert paused_at < first <= paused_at + 2, (step, paused_at, first)
        assert_running_and_consistent(g, mark)


def backing_chain(image: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
                         capture_output=True, text=True, check=True)
    return [d["filename"] for d in json.loads(out.stdout)]


def test_delete_merging_a_layer_killed_at_every_step(fault_agent: Agent, guest_image: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """External snapshots m then n: deleting m merges its layer (inside the
    running chain) into the image below, and n is told that image. Killed at
    every step, the next agent finishes it: the chain is one layer shorter
    and consistent, and n (and an older snapshot) revert exactly."""
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2")
    external = pb.SNAPSHOT_METHOD_EXTERNAL
    g.create_snapshot(name="keep", live=True, method=external)
    for step in DELETE_STEPS:
        g.create_snapshot(name=f"m-{step}", live=True, method=external)
        g.create_snapshot(name=f"n-{step}", live=True, method=external)
        top = next(d.target for d in g.domain().disks if d.vdev == "xvda")
        depth = len(backing_chain(top))
        run_until_killed(fault_agent, f"delete:{step}", pb.DeleteSnapshotRequest(
            domain_name=g.name, snapshot_name=f"m-{step}", request_id=uuid.uuid4().hex))
        stub = fault_agent.stub()
        listed = [s.name for s in stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        assert f"m-{step}" not in listed and f"n-{step}" in listed, step
        assert not (fault_agent.snapshot_root / g.name / f"m-{step}").exists(), f"{step}: m's files stay"
        chain = backing_chain(top)
        assert len(chain) == depth - 1, f"{step}: {chain}"
        n = stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name=f"n-{step}"), timeout=30)
        assert n.disks[0].image == chain[1], f"{step}: n must name the image m's layer was merged into"
        assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"
        assert_running_and_consistent(g, g.mark())
    for name in (f"n-{DELETE_STEPS[-1]}", "keep"):
        mark = g.mark()
        g.revert(name)
        guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=mark)
        assert not guestprobe.mismatches(g.serial, mark), name


def test_a_delete_failing_half_way_is_done_again_or_finished_by_the_next_agent(
        fault_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> None:
    g = start_guest(fault_agent, guest_image, tmp_path, "qcow2")
    xvda = g.disks["xvda"][0]
    for name in ("keep", "f1", "f2"):
        g.create_snapshot(name=name)

    def delete(name: str) -> None:
        list(fault_agent.stub().DeleteSnapshot(pb.DeleteSnapshotRequest(
            domain_name=g.name, snapshot_name=name, request_id=uuid.uuid4().hex), timeout=120))

    def gone(name: str) -> None:
        listed = [s.name for s in fault_agent.stub().ListSnapshots(
            pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots]
        assert name not in listed and "keep" in listed
        assert name not in tags(xvda) and "keep" in tags(xvda)
        assert not (fault_agent.snapshot_root / g.name / name).exists()
        assert not list((fault_agent.state_dir / "journal").glob("*.json")), "journal entry left behind"

    try:
        # Fails once: done again in the same call.
        restart_with(fault_agent, "delete:disks:1")
        delete("f1")
        gone("f1")
        # Fails twice: no longer listed; the next agent removes the rest.
        restart_with(fault_agent, "delete:files:2")
        with pytest.raises(grpc.RpcError) as err:
            delete("f2")
        assert "failed half-way, twice" in (err.value.details() or "")
        assert len(list((fault_agent.state_dir / "journal").glob("*.json"))) == 1
        restart_with(fault_agent, None)
        gone("f2")
        ops = [o for o in fault_agent.stub().ListOperations(pb.ListOperationsRequest(), timeout=30).operations
               if o.snapshot == "f2" and o.kind == pb.OPERATION_KIND_DELETE_SNAPSHOT]
        assert [o.state for o in ops] == [pb.OPERATION_STATE_SUCCEEDED]
    finally:
        restart_with(fault_agent, None)
    mark = g.mark()
    g.revert("keep")
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=20, offset=mark)
    assert not guestprobe.mismatches(g.serial, mark)


# The first kill point after the NVRAM copy (made and synced in the pause;
# before it the general matrix above holds), and the one past the manifest;
# for a revert, before and after the NVRAM is put back.
NVRAM_CREATE_STEPS = ["copy:xvda", "register"]
NVRAM_REVERT_STEPS = ["restore", "restored"]


def test_uefi_nvram_killed_around_its_copy(fault_agent: Agent, guest_image: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    """The test guest under OVMF (its kernel handed over by the firmware):
    killed around the copy of the NVRAM into a snapshot, the snapshot is
    rolled back with its copy, or kept with a whole one; killed around a
    revert's putting it back, the next agent finishes the revert and the
    domain's NVRAM is the snapshot's, whole, with no temporary file beside it."""
    name = f"u{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    disks = {"xvda": (folder / "xvda.qcow2", "qcow2")}
    make_disk(disks["xvda"][0], "qcow2")
    serial = folder / "serial.log"
    cfg = folder / "guest.cfg"
    # OVMF under TCG stops on an invalid opcode with 128 MiB; 256 boots.
    cfg.write_text(guest_config(name, *guest_image, disks, serial, memory=256) + 'type = "hvm"\nbios = "ovmf"\n')
    fault_agent.cli("create", str(cfg), check=True)
    g = Guest(fault_agent, name, folder, disks, serial)
    # Not READY: OVMF's screen codes precede it on its line.
    guestprobe.wait_disk_ok(serial, "vda", timeout=180)
    nvram = fault_agent.state_dir / "qemu" / "nvram" / f"{name}.fd"
    root = fault_agent.snapshot_root / name
    for step in NVRAM_CREATE_STEPS:
        snap = f"n-{step.replace(':', '-')}"
        mark = g.mark()
        run_until_killed(fault_agent, f"create:{step}", pb.CreateSnapshotRequest(
            domain_name=name, name=snap, request_id=uuid.uuid4().hex))
        copies = list((root / snap).glob("*.nvram")) if (root / snap).exists() else []
        if step == "register":
            # The guest writes no variable after its boot: the copy of the
            # instant is the file as it is now, byte for byte.
            assert [c.read_bytes() for c in copies] == [nvram.read_bytes()], copies
        else:
            assert not (root / snap).exists(), f"{step}: snapshot directory (and its NVRAM copy) left behind"
        assert_running_and_consistent(g, mark)

    at_snapshot = nvram.read_bytes()
    for step in NVRAM_REVERT_STEPS:
        # Stands for a variable the guest wrote after the snapshot (a real
        # write: tests/integration/test_hvm_guest.py). QEMU writes its flash
        # back only where the guest writes, so the running guest is unaffected.
        with open(nvram, "r+b") as f:
            f.seek(-1, 2)
            f.write(bytes([at_snapshot[-1] ^ 0xFF]))
        mark = g.mark()
        run_until_killed(fault_agent, f"revert:{step}", pb.RevertSnapshotRequest(
            domain_name=name, snapshot_name="n-register", request_id=uuid.uuid4().hex))
        assert nvram.read_bytes() == at_snapshot, f"{step}: the NVRAM is not the snapshot's"
        assert sorted(p.name for p in nvram.parent.iterdir() if p.name.startswith(name)) == [nvram.name], step
        guestprobe.wait_for(serial, counter_after_rewind, timeout=60, offset=mark,
                            what="the counter going back to the snapshot's")
        assert_running_and_consistent(g, mark)
    fault_agent.stub().DestroyDomain(pb.DestroyDomainRequest(domain_name=name), timeout=60)
