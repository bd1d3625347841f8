"""Hostile paths and manifests against a real agent (run as root), its socket
open to a read-only group and an admin group, one real guest.

Each test replays an attack that once worked: a manifest that is a FIFO or a
link to /dev/zero, manifests planted inside and outside the snapshot roots
that name other files, a folder in a root owned by another user swapped for
a symlink by a racing process, a machine type with QEMU options in it, a
request id reused for another request, a listing after a delete. A fuzz of
random manifests checks that no file outside the manifest's own folder is
touched and that the agent keeps answering health within a second.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import Guest, own_agent, start_guest
from tests.integration.test_security import NOBODY, cli_as

pytestmark = pytest.mark.guest


@dataclass
class Lab:
    agent: Agent
    guest: Guest
    base: Path
    # The snapshot root that tests plant folders in (root-owned, 0755).
    root: Path
    # A folder outside every root, owned by an unprivileged user.
    outside: Path
    reader: tuple[int, ...]
    admin: tuple[int, ...]


def _gid(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pytest.skip(f"no group {name!r} on this machine")


@pytest.fixture(scope="module")
def lab(accel: str, guest_image: tuple[Path, Path]) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to be other users and to own the snapshot roots")
    users, staff = _gid("users"), _gid("staff")
    # Outside pytest's 0700 temp dirs, so that other users can reach the socket and their folders.
    base = Path(tempfile.mkdtemp(prefix="domsnap-hostile-"))
    base.chmod(0o755)
    root = base / "shared"
    root.mkdir(mode=0o755)
    outside = base / "outside"
    outside.mkdir()
    os.chown(outside, NOBODY, NOBODY)
    (base / "guests").mkdir()
    top = (f'socket_group = "users"\nadmin_group = "staff"\n'
           f'snapshot_roots = ["{base / "snapshots"}", "{root}"]\n')
    try:
        with own_agent(base, accel, top=top) as agent:
            guest = start_guest(agent, guest_image, base / "guests", "qcow2", wait=False)
            agent.cli("snapshot-create", guest.name, "--name", "real", check=True)
            yield Lab(agent, guest, base, root, outside, (NOBODY, NOBODY, users), (NOBODY, NOBODY, users, staff))
    finally:
        shutil.rmtree(base)


def code_and_message(call: Any, request: Any, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(request, timeout=timeout)
        if not hasattr(result, "SerializeToString"):
            list(result)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def health_within(agent: Agent, seconds: float) -> None:
    with grpc.insecure_channel(agent.address) as ch:
        start = time.monotonic()
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=seconds)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - start < seconds


def rss_mib(agent: Agent) -> float:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def real_manifest(lab: Lab) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((lab.agent.snapshot_root / lab.guest.name / "real" / "snapshot.json")
                                      .read_text())
    return data


def planted(lab: Lab, name: str) -> Path:
    folder = lab.root / f"{name}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(mode=0o755)
    return folder


def fingerprint(paths: list[Path]) -> dict[str, tuple[int, int, int] | None]:
    out: dict[str, tuple[int, int, int] | None] = {}
    for top in paths:
        for p in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else [])]:
            try:
                st_ = os.lstat(p)
                # A running guest writes its disk and console: for those, the same file is enough.
                live = p.suffix in (".qcow2", ".log") and "guests" in p.parts
                out[str(p)] = (st_.st_ino, 0, 0) if live else (st_.st_ino, st_.st_size, st_.st_mtime_ns)
            except FileNotFoundError:
                out[str(p)] = None
    return out


def snapshot_names(lab: Lab) -> list[str]:
    snaps = lab.agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=lab.guest.name), timeout=30).snapshots
    return sorted(s.name for s in snaps)


# ------------------------------------------------------------ rows 1 and 2 ----

def test_a_fifo_manifest_is_refused_at_once_and_the_agent_keeps_serving(lab: Lab) -> None:
    inside = planted(lab, "fifo")
    os.mkfifo(inside / "snapshot.json")
    user_owned = lab.outside / f"fifo-{uuid.uuid4().hex[:6]}"
    user_owned.mkdir()
    os.mkfifo(user_owned / "snapshot.json")
    started = time.monotonic()
    # As the read-only user, on the agent's socket: the attack as it was made.
    out = cli_as(lab.reader, "-H", lab.agent.address, "snapshot-info", lab.guest.name, str(inside))
    assert out.returncode == 1
    assert out.stderr == f"domsnap: {inside}/snapshot.json: not a snapshot manifest " \
                         f"({inside}/snapshot.json is not a regular file)\n"
    out = cli_as(lab.reader, "-H", lab.agent.address, "snapshot-info", lab.guest.name, str(user_owned))
    assert out.returncode == 1
    assert "outside the snapshot roots" in out.stderr
    assert time.monotonic() - started < 20
    health_within(lab.agent, 1.0)
    code, _ = code_and_message(lab.agent.stub().ListDomains, pb.ListDomainsRequest(), timeout=2)
    assert code == grpc.StatusCode.OK


def test_a_manifest_linked_to_dev_zero_or_huge_is_refused_without_reading_it(lab: Lab) -> None:
    before = rss_mib(lab.agent)
    zero = planted(lab, "zero")
    (zero / "snapshot.json").symlink_to("/dev/zero")
    huge = planted(lab, "huge")
    (huge / "snapshot.json").write_bytes(b" " * (3 << 20))
    linked = planted(lab, "linked")
    (linked / "snapshot.json").symlink_to(lab.agent.snapshot_root / lab.guest.name / "real" / "snapshot.json")
    stub = lab.agent.stub()
    for folder, why in ((zero, "is a symlink"), (huge, "is larger than"), (linked, "is a symlink")):
        for call, request in ((stub.GetSnapshot, pb.GetSnapshotRequest(domain_name=lab.guest.name,
                                                                       snapshot_path=str(folder))),
                              (stub.DeleteSnapshot, pb.DeleteSnapshotRequest(domain_name=lab.guest.name,
                                                                             snapshot_path=str(folder)))):
            code, message = code_and_message(call, request)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, message
            assert why in message, message
    assert rss_mib(lab.agent) < before + 50
    assert (linked / "snapshot.json").is_symlink()
    assert "real" in snapshot_names(lab)


# ------------------------------------------------------------------ row 3 ----

def _victims(lab: Lab) -> list[Path]:
    victims = []
    for where in (lab.base / "guests", lab.outside, lab.root):
        victim = where / f"victim-{uuid.uuid4().hex[:6]}"
        victim.write_text("root's own\n")
        victim.chmod(0o600)
        victims.append(victim)
    return victims


def test_a_planted_manifest_outside_the_roots_is_refused_and_nothing_is_deleted(lab: Lab) -> None:
    folder = lab.outside / f"planted-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    victims = _victims(lab)
    m = real_manifest(lab)
    m.update(memory_file=str(victims[0]), disks=[{**m["disks"][0], "file": str(victims[1])}])
    (folder / "snapshot.json").write_text(json.dumps(m))
    before = fingerprint([folder, *victims])
    code, message = code_and_message(lab.agent.stub().DeleteSnapshot,
                                     pb.DeleteSnapshotRequest(domain_name=lab.guest.name, snapshot_path=str(folder)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the snapshot roots" in message
    assert fingerprint([folder, *victims]) == before


def test_a_planted_manifest_inside_a_root_touches_only_its_own_folder(lab: Lab) -> None:
    victims = _victims(lab)
    m = real_manifest(lab)
    folder = planted(lab, "named")
    # Same name as the domain's real snapshot, files elsewhere.
    m.update(memory_file=str(victims[0]), disks=[{**m["disks"][0], "method": "external", "file": str(victims[1])}])
    (folder / "snapshot.json").write_text(json.dumps(m))
    before = fingerprint([folder, *victims, lab.agent.snapshot_root, lab.base / "guests"])
    stub = lab.agent.stub()
    for call, request in ((stub.DeleteSnapshot, pb.DeleteSnapshotRequest(domain_name=lab.guest.name,
                                                                         snapshot_path=str(folder))),
                          (stub.RevertSnapshot, pb.RevertSnapshotRequest(domain_name=lab.guest.name,
                                                                         snapshot_path=str(folder),
                                                                         force=True))):
        code, message = code_and_message(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        assert str(victims[0]) in message and "not made by this agent" in message, message
    assert fingerprint([folder, *victims, lab.agent.snapshot_root, lab.base / "guests"]) == before
    assert lab.guest.domain().state == pb.DOMAIN_STATE_RUNNING

    # Its own files only: the delete removes that folder and leaves the
    # domain's snapshot of the same name registered and whole.
    own = planted(lab, "own")
    (own / "memory.save").write_text("x")
    m.update(memory_file=str(own / "memory.save"), disks=[])
    (own / "snapshot.json").write_text(json.dumps(m))
    real = fingerprint([lab.agent.snapshot_root, lab.base / "guests", *victims])
    code, message = code_and_message(lab.agent.stub().DeleteSnapshot,
                                     pb.DeleteSnapshotRequest(domain_name=lab.guest.name,
                                                              snapshot_path=str(own)), timeout=60)
    assert code == grpc.StatusCode.OK, message
    assert not own.exists()
    assert "real" in snapshot_names(lab)
    assert fingerprint([lab.agent.snapshot_root, lab.base / "guests", *victims]) == real


# ------------------------------------------------------------------ row 4 ----

AS_USER_LOOP = """
import os, sys, time
os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
folder, target, until = sys.argv[2], sys.argv[3], time.monotonic() + float(sys.argv[4])
aside = folder + ".aside"
while time.monotonic() < until:
    try:
        os.mkdir(folder)
        os.rename(folder, aside)
        os.symlink(target, folder)
        os.unlink(folder)
        os.rmdir(aside)
    except OSError:
        pass
"""


def test_a_users_folder_in_a_root_is_refused_even_while_raced(lab: Lab) -> None:
    alice = lab.root / f"alice-{uuid.uuid4().hex[:6]}"
    alice.mkdir()
    os.chown(alice, NOBODY, NOBODY)
    target = lab.outside / f"target-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    os.chown(target, NOBODY, NOBODY)
    racer = subprocess.Popen([sys.executable, "-c", AS_USER_LOOP, str(NOBODY), str(alice / "snap"), str(target), "30"])
    try:
        stub = lab.agent.stub()
        for i in range(10):
            code, message = code_and_message(stub.CreateSnapshot, pb.CreateSnapshotRequest(
                domain_name=lab.guest.name, name=f"race{i}", path=str(alice / "snap" / "s"),
                request_id=uuid.uuid4().hex), timeout=60)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, message
            # Refused for the folder's owner, or, caught swapped, for leaving the roots.
            assert f"{alice} is owned by uid {NOBODY}" in message or "outside the snapshot roots" in message, message
        code, message = code_and_message(stub.GetSnapshot, pb.GetSnapshotRequest(
            domain_name=lab.guest.name, snapshot_path=str(alice / "snap")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    finally:
        racer.kill()
        racer.wait()
    assert not any(target.iterdir())
    assert not any(n.startswith("race") for n in snapshot_names(lab))
    # What the agent makes is its own: nobody else can swap a manifest in it.
    made = os.lstat(lab.agent.snapshot_root / lab.guest.name / "real")
    assert (made.st_uid, stat.S_IMODE(made.st_mode)) == (0, 0o700)
    assert lab.guest.domain().state == pb.DOMAIN_STATE_RUNNING


# ------------------------------------------------------------------ row 5 ----

def test_a_machine_type_with_options_in_it_is_refused_before_the_domain_is_touched(lab: Lab) -> None:
    lab.agent.cli("snapshot-create", lab.guest.name, "--name", "machine", check=True)
    manifest = lab.agent.snapshot_root / lab.guest.name / "machine" / "snapshot.json"
    m = json.loads(manifest.read_text())
    m["facts"]["machine"] = "pc-i440fx-7.2,accel=kvm,memory-backend=evil"
    manifest.write_text(json.dumps(m))
    domid = lab.guest.domain().domid
    code, message = code_and_message(lab.agent.stub().RevertSnapshot, pb.RevertSnapshotRequest(
        domain_name=lab.guest.name, snapshot_name="machine", request_id=uuid.uuid4().hex), timeout=60)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert "machine type 'pc-i440fx-7.2,accel=kvm,memory-backend=evil' is not one that" in message
    d = lab.guest.domain()
    assert (d.state, d.domid) == (pb.DOMAIN_STATE_RUNNING, domid)
    lab.agent.cli("snapshot-delete", lab.guest.name, "machine", check=True)


# ------------------------------------------------------------------ row 6 ----

def test_a_request_id_means_one_request(lab: Lab) -> None:
    stub, name = lab.agent.stub(), lab.guest.name
    rid = uuid.uuid4().hex
    assert stub.PauseDomain(pb.PauseDomainRequest(domain_name=name, request_id=rid), timeout=30).state == \
        pb.DOMAIN_STATE_PAUSED
    # The same request again: the first answer, not a second pause.
    assert stub.PauseDomain(pb.PauseDomainRequest(domain_name=name, request_id=rid), timeout=30).state == \
        pb.DOMAIN_STATE_PAUSED
    # Another RPC with the same id is another request: it runs.
    assert stub.UnpauseDomain(pb.UnpauseDomainRequest(domain_name=name, request_id=rid), timeout=30).state == \
        pb.DOMAIN_STATE_RUNNING
    assert lab.guest.domain().state == pb.DOMAIN_STATE_RUNNING
    code, message = code_and_message(stub.PauseDomain, pb.PauseDomainRequest(domain_name="other", request_id=rid))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == (f"request_id {rid!r} was already used for a different request, "
                       f"PauseDomain(domain_name={name!r}); a new request needs a new request_id")
    # Another caller's ids are its own: the admin group's user pauses with the same id.
    out = cli_as(lab.admin, "-H", lab.agent.address, "--request-id", rid, "pause", name)
    assert out.returncode == 0, out.stderr
    assert lab.guest.domain().state == pb.DOMAIN_STATE_PAUSED
    lab.agent.cli("unpause", name, check=True)

    rid = uuid.uuid4().hex
    first = list(stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=name, name="rA", request_id=rid),
                                     timeout=120))
    again = list(stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=name, name="rA", request_id=rid),
                                     timeout=120))
    assert again[0].started.id == first[0].started.id
    code, message = code_and_message(stub.CreateSnapshot,
                                     pb.CreateSnapshotRequest(domain_name=name, name="rB", request_id=rid))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"CreateSnapshot(domain_name={name!r} name='rA')" in message
    assert "rB" not in snapshot_names(lab)


# ------------------------------------------------------------------ row 7 ----

def test_operations_are_listed_after_a_snapshot_they_made_was_deleted(lab: Lab) -> None:
    lab.agent.cli("snapshot-create", lab.guest.name, "--name", "gone", check=True)
    lab.agent.cli("snapshot-delete", lab.guest.name, "gone", check=True)
    ops = lab.agent.stub().ListOperations(pb.ListOperationsRequest(), timeout=30).operations
    made = [o for o in ops if o.snapshot == "gone" and o.kind == pb.OPERATION_KIND_CREATE_SNAPSHOT]
    assert made and made[0].result.name == "gone" and made[0].result.size_bytes == 0
    out = cli_as(lab.reader, "-H", lab.agent.address, "operations")
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------- fuzz ----

ODD = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                st.just("x" * 200_000))
FIELDS = ["name", "domain", "description", "created_at", "finished_at", "state", "live", "domain_config", "disks",
          "memory_file", "memory_bytes", "driver", "hypervisor_version", "facts", "parent", "downtime",
          "format", "version"]


@st.composite
def manifests(draw: st.DrawFn, paths: list[str]) -> dict[str, Any]:
    path = st.one_of(st.sampled_from(paths), st.text(max_size=30).map(lambda s: "/" + s))
    disk = st.fixed_dictionaries({
        "vdev": st.sampled_from(["xvda", "xvdb", "../x"]), "format": st.sampled_from(["qcow2", "raw", "vhd"]),
        "backend": st.sampled_from(["qcow2", "raw", "vhd", "lvm"]), "method": st.sampled_from(["internal", "external"]),
        "image": path, "tag": st.sampled_from(["real", "", "-x"]), "file": st.one_of(st.just(""), path)})
    m: dict[str, Any] = {"disks": draw(st.lists(disk, max_size=3)), "memory_file": draw(path)}
    for f in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        m[f] = draw(ODD)
    return m


def test_random_manifests_touch_nothing_outside_their_folder(lab: Lab) -> None:
    victims = _victims(lab)
    guarded = [*victims, lab.agent.snapshot_root, lab.base / "guests", lab.agent.state_dir / "catalogue"]
    paths = [str(v) for v in victims] + [str(p) for p in (lab.base / "guests").rglob("*")] + [
        str(lab.agent.snapshot_root / lab.guest.name / "real" / "memory.save"), "/etc/passwd", "/dev/zero"]
    base = real_manifest(lab)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(changes=manifests(paths))
    def attempt(changes: dict[str, Any]) -> None:
        folder = planted(lab, "fuzz")
        try:
            (folder / "snapshot.json").write_text(json.dumps({**base, **changes}))
            before = fingerprint(guarded)
            stub = lab.agent.stub()
            for call, request in (
                    (stub.GetSnapshot, pb.GetSnapshotRequest(domain_name=lab.guest.name, snapshot_path=str(folder))),
                    (stub.RevertSnapshot, pb.RevertSnapshotRequest(domain_name=lab.guest.name,
                                                                   snapshot_path=str(folder),
                                                                   force=True)),
                    (stub.DeleteSnapshot, pb.DeleteSnapshotRequest(domain_name=lab.guest.name,
                                                                   snapshot_path=str(folder)))):
                code, message = code_and_message(call, request, timeout=60)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                                grpc.StatusCode.INVALID_ARGUMENT), (code, message)
                health_within(lab.agent, 1.0)
            assert fingerprint(guarded) == before
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)

    attempt()
    assert "real" in snapshot_names(lab)
    assert lab.guest.domain().state == pb.DOMAIN_STATE_RUNNING
    assert "Traceback" not in lab.agent.log.read_text()


# ------------------------------------------------------------------ row 8 ----

HOLD_CONNECTIONS = """
import os, socket, sys, time
os.setgroups([int(g) for g in sys.argv[2].split(",")]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
held = []
for _ in range(int(sys.argv[4])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[3])
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def test_thousands_of_idle_connections_cost_one_log_line_and_keep_root_served(lab: Lab) -> None:
    users = str(lab.reader[2])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CONNECTIONS, str(NOBODY), users, str(lab.agent.sock),
                               "4000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "4000"
        time.sleep(1)
        health_within(lab.agent, 1.0)
        assert lab.agent.cli("list").returncode == 0
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    log = lab.agent.log.read_text()
    assert "Too many open files" not in log
    refused = [line for line in log.splitlines() if "connection(s) refused" in line]
    assert len(refused) == 1, refused
    assert "uid 65534 holds 64" in refused[0]
    health_within(lab.agent, 1.0)
