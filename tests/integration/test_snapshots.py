"""Domain snapshots on real guests: RAM and every disk at one instant, and the
revert that brings a domain back to that instant.

The test guest proves a revert by itself (guest/init): its counter lives only
in RAM, so the first ``C n`` after a revert says which instant the RAM came
from; its disk check compares sector 0 with what that RAM says it wrote last,
so ``DISK <dev> ok`` after a revert says that every disk came from the same
instant as the RAM, and ``MISMATCH`` that one did not.

Bounds used throughout: ``c_before`` (the last counter printed before the
create call) <= the counter at the snapshot instant <= ``c_after`` (the last
one printed when the call returned); after a correct revert the guest goes on
with the instant's counter + 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from tests.integration.conftest import Agent, BootGuest, Guest

pytestmark = [pytest.mark.guest]

#: How long a guest runs on after a snapshot before it is reverted: long
#: enough that its counter and its disks are well past the snapshot's.
RUN_ON = 2.0
#: Ticks of the guest (100 ms each) between two disk checks.
CHECK_EVERY = 10

INTERNAL = pb.SNAPSHOT_METHOD_INTERNAL
EXTERNAL = pb.SNAPSHOT_METHOD_EXTERNAL
CREATE = pb.OPERATION_KIND_CREATE_SNAPSHOT
REVERT = pb.OPERATION_KIND_REVERT_SNAPSHOT
RUNNING = pb.DOMAIN_STATE_RUNNING
PAUSED = pb.DOMAIN_STATE_PAUSED


# ------------------------------------------------------------ serial lines
#
# The lines are matched at their *end*: when a domain is destroyed in the
# middle of a line, the restored guest's first line is glued to that
# fragment ("C 1" + "C 58" reads "C 1C 58"), and it is the restored guest's
# line, at the end, that counts.

_COUNTER_END = re.compile(r"C (\d+)$")
_DISK_END = re.compile(
    r"DISK (?P<dev>vd[a-z]+) (?:(?P<init>init)|ok (?P<ok>\d+)"
    r"|(?P<mismatch>MISMATCH) disk=\S+ ram=\S+|(?P<error>ERROR) (?:read|write))$"
)


@dataclass(frozen=True)
class Item:
    """One parsed serial line: a counter, or a disk check."""

    line: str
    counter: int | None = None
    dev: str = ""
    # "ok", "init", "MISMATCH", "ERROR"
    status: str = ""
    value: int | None = None

    @property
    def bad(self) -> bool:
        return self.status in ("MISMATCH", "ERROR")


def parse(line: str) -> Item | None:
    if m := _DISK_END.search(line):
        status = "init" if m["init"] else "ok" if m["ok"] is not None else m["mismatch"] or m["error"]
        return Item(line, dev=m["dev"], status=status, value=int(m["ok"]) if m["ok"] is not None else None)
    if m := _COUNTER_END.search(line):
        return Item(line, counter=int(m[1]))
    return None


def items(lines: Iterable[str]) -> list[Item]:
    return [it for it in map(parse, lines) if it is not None]


def bad_lines(g: Guest, offset: int = 0) -> list[str]:
    """Disk checks that failed since offset; after a mark, also a guest that
    started afresh (`init`) instead of going on from a snapshot."""
    return [it.line for it in items(g.lines_since(offset)) if it.bad or (offset and it.status == "init")]


def devices(g: Guest) -> list[str]:
    """The guest's names of the disks it checks: xvda -> vda."""
    return list(g.checks) or ["v" + vdev[2:] for vdev in g.disks]


def mark_with_counter(g: Guest) -> tuple[int, int]:
    """The offset just past the last complete line, and the last counter
    before it (a fragment after it belongs to what comes next)."""
    data = g.serial.read_bytes()
    end = data.rfind(b"\n") + 1
    counters = [it.counter for it in items(data[:end].decode("ascii", "replace").splitlines())
                if it.counter is not None]
    assert counters, "the guest printed no counter yet"
    return end, counters[-1]


def wait_tick(g: Guest, residue: int = 1, timeout: float = 3.0) -> int:
    """Wait for a counter n with n % 10 == residue and return it.

    With residue 1 the guest has just finished a disk check cycle (it prints
    `C 10k`, checks and writes every disk with 10k, then prints `C 10k+1`), so
    a snapshot taken at once falls well between two checks.
    """
    offset = g.mark()

    def seen(lines: list[str]) -> int | None:
        for it in items(lines):
            if it.counter is not None and it.counter % CHECK_EVERY == residue:
                return it.counter
        return None

    return guestprobe.wait_for(g.serial, seen, timeout, offset=offset, what=f"a counter ending in {residue}")


def expected_disk_values(first: int) -> set[int]:
    """What the disks hold at an instant whose counter was first - 1: the last
    multiple of 10 the guest wrote; if the instant fell in the tick that
    checks the disks, that check may not have written yet."""
    instant = first - 1
    base = instant - instant % CHECK_EVERY
    return {base, base - CHECK_EVERY} if instant % CHECK_EVERY == 0 else {base}


def run_on(g: Guest, seconds: float = RUN_ON) -> int:
    """Let the guest run at least `seconds` more (by its own counter)."""
    now = g.counter()
    return guestprobe.wait_counter_above(g.serial, now + int(seconds * 10), timeout=seconds * 4 + 5)


# ----------------------------------------------------------------- streams


CREATE_PHASES = {"validate", "memory", "disks", "manifest"}
REVERT_PHASES = {"validate", "destroy", "disks", "restore"}


def check_stream(events: list[pb.OperationEvent], kind: int, phases: set[str]) -> pb.Operation:
    """started (with an id) -> progress (named phases, percent only going up) ->
    finished SUCCEEDED with a result; returns the finished operation."""
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"progress"}, kinds
    started, finished = events[0].started, events[-1].finished
    assert started.id, "the first event carries no operation id"
    assert (started.kind, finished.kind) == (kind, kind)
    assert finished.id == started.id
    assert finished.state == pb.OPERATION_STATE_SUCCEEDED, (pb.OperationState.Name(finished.state),
                                                            finished.error.message)
    progress = [e.progress for e in events[1:-1]]
    assert progress, "no progress events"
    assert all(p.phase for p in progress), "a progress event without a phase name"
    names = [pb.Phase.Name(p.phase).removeprefix("PHASE_").lower() for p in progress]
    seen = set(names)
    assert phases <= seen, f"phases {sorted(phases - seen)} missing from {names}"
    percents = [p.percent for p in progress]
    assert percents == sorted(percents), percents
    assert percents[0] >= 0 and percents[-1] <= 100, percents
    assert finished.HasField("result"), "a finished operation without its result"
    return finished


# --------------------------------------------------------------- snapshots


@dataclass
class Taken:
    snap: pb.Snapshot
    c_before: int
    c_after: int


def take(g: Guest, name: str, *, align: bool = True, **fields: Any) -> Taken:
    """Create a snapshot (aligned just after a disk check unless told not to)
    and check its stream and its result."""
    if align:
        wait_tick(g)
    c_before = g.counter()
    events = g.create_snapshot(name=name, **fields)
    c_after = g.counter()
    snap = check_stream(events, CREATE, CREATE_PHASES).result
    assert snap.name == name
    assert snap.domain == g.name
    assert snap.live == bool(fields.get("live", False))
    assert snap.memory.size_bytes > 0
    assert Path(snap.memory.path).is_file()
    assert os.path.getsize(snap.memory.path) == snap.memory.size_bytes
    assert (Path(snap.path) / "snapshot.json").is_file()
    assert sorted(d.vdev for d in snap.disks) == sorted(g.disks)
    assert c_before <= c_after
    return Taken(snap, c_before, c_after)


@dataclass
class AfterRevert:
    """What the guest printed around a revert."""

    # The counters and disk checks the old guest printed after the mark.
    before: list[Item]
    # Everything the restored guest printed.
    after: list[Item]

    @property
    def first_counter(self) -> int:
        return next(it.counter for it in self.after if it.counter is not None)

    def first_ok(self, dev: str) -> int:
        value = next(it.value for it in self.after if it.dev == dev and it.status == "ok")
        assert value is not None
        return value

    def counters(self) -> list[int]:
        return [it.counter for it in self.after if it.counter is not None]


def _restored_from(seen: list[Item], c_pre: int) -> int | None:
    """Index of the first line the restored guest printed, None if none yet.

    The old guest goes on from `c_pre` one by one, and after each `C 10k` it
    checks every disk and finds 10k - 10 there; the first line that breaks
    that pattern is the restored guest's.
    """
    prev = c_pre
    for i, it in enumerate(seen):
        if it.counter is not None:
            if it.counter != prev + 1:
                return i
            prev = it.counter
        elif not (prev % CHECK_EVERY == 0 and it.status == "ok" and it.value == prev - CHECK_EVERY):
            return i
    return None


def wait_restored(g: Guest, offset: int, c_pre: int, *, oks: int = 2, timeout: float = 30.0) -> AfterRevert:
    """Wait until the restored guest printed a counter and `oks` disk checks
    that said ok on every device."""
    devs = devices(g)

    def check(lines: list[str]) -> AfterRevert | None:
        seen = items(lines)
        start = _restored_from(seen, c_pre)
        if start is None:
            return None
        after = seen[start:]
        if not any(it.counter is not None for it in after):
            return None
        if any(sum(1 for it in after if it.dev == d and it.status == "ok") < oks for d in devs):
            return None
        return AfterRevert(seen[:start], after)

    return guestprobe.wait_for(g.serial, check, timeout, offset=offset,
                               what=f"the restored guest's counter and {oks} ok disk check(s)")


def revert_and_check(
    g: Guest, taken: Taken, *, oks: int = 2, do: Callable[[], object] | None = None, **fields: Any,
) -> AfterRevert:
    """Revert (through the API, or `do`) to a running snapshot and prove that
    RAM and every disk came back from the snapshot's instant."""
    offset, c_pre = mark_with_counter(g)
    if do is None:
        result = check_stream(g.revert(taken.snap.name, **fields), REVERT, REVERT_PHASES).result
        assert result.name == taken.snap.name
    else:
        do()
    seen = wait_restored(g, offset, c_pre, oks=oks)
    first = seen.first_counter
    assert taken.c_before + 1 <= first <= taken.c_after + 1, (
        f"the first counter after the revert is {first}; the snapshot was taken between "
        f"{taken.c_before} and {taken.c_after}")
    counters = seen.counters()
    assert counters == list(range(first, first + len(counters))), counters
    assert not bad_lines(g, offset), bad_lines(g, offset)
    values = {dev: seen.first_ok(dev) for dev in devices(g)}
    for dev, value in values.items():
        assert value in expected_disk_values(first), (
            f"{dev} held {value} after the revert; at counter {first - 1} it held "
            f"{sorted(expected_disk_values(first))}")
    d = g.domain()
    assert d.state == RUNNING
    assert d.busy_with_operation == ""
    return seen


# ------------------------------------------------------------ disk images


def img_info(path: str | Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         timeout=30, check=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def tags(path: str | Path) -> list[str]:
    return [s["name"] for s in img_info(path).get("snapshots", [])]


def disk_target(g: Guest, vdev: str = "xvda") -> str:
    return next(d.target for d in g.domain().disks if d.vdev == vdev)


def tree(root: Path) -> set[str]:
    """Every file and directory under root, relative."""
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ====================================================================== 1


@pytest.mark.slow
@pytest.mark.parametrize("live", [False, True], ids=["nonlive", "live"])
@pytest.mark.parametrize(
    ("fmt", "method"),
    [("qcow2", INTERNAL), ("qcow2", EXTERNAL), ("raw", EXTERNAL)],
    ids=["qcow2-internal", "qcow2-external", "raw-external"],
)
def test_revert_brings_ram_and_disk_back_to_the_snapshot_instant(
    agent: Agent, boot_guest: BootGuest, fmt: str, method: int, live: bool,
) -> None:
    g = boot_guest(fmt)
    image = g.disks["xvda"][0]
    name = f"fid-{uuid.uuid4().hex[:6]}"

    t = take(g, name, live=live, method=method)
    snapdir = Path(t.snap.path)
    assert snapdir == agent.snapshot_root / g.name / name
    (rec,) = t.snap.disks
    assert (rec.vdev, rec.format, rec.method, rec.image) == ("xvda", fmt, method, str(image))
    assert g.domain().state == RUNNING, "a running domain must be running after a create"

    if method == INTERNAL:
        assert rec.tag == name
        assert name in tags(image)
        assert disk_target(g) == str(image)
    elif fmt == "qcow2":
        overlay = snapdir / "xvda.qcow2"
        assert rec.file == str(overlay)
        assert disk_target(g) == str(overlay), "the domain should go on in the overlay"
        info = img_info(overlay)
        assert info["format"] == "qcow2"
        assert info["full-backing-filename"] == str(image)
    else:
        copy = snapdir / "xvda.raw"
        assert rec.file == str(copy)
        assert copy.is_file()
        assert disk_target(g) == str(image)

    run_on(g)
    seen = revert_and_check(g, t)

    if method == INTERNAL:
        assert disk_target(g) == str(image)
        assert name in tags(image)
    elif fmt == "qcow2":
        fresh = disk_target(g)
        assert fresh not in (str(image), str(snapdir / "xvda.qcow2")), "a revert must not reuse an overlay"
        assert Path(fresh).parent == snapdir
        assert img_info(fresh)["full-backing-filename"] == str(image)
        assert not (snapdir / "xvda.qcow2").exists(), "the discarded state's overlay is left behind"
        # The frozen image still holds the snapshot's disk.
        assert guestprobe.disk_counter(image, "qcow2") == seen.first_ok("vda")
    else:
        assert disk_target(g) == str(image)
        assert guestprobe.disk_counter(snapdir / "xvda.raw", "raw") == seen.first_ok("vda")
    assert not bad_lines(g), "a disk check failed since boot"


# ====================================================================== 2


@pytest.mark.slow
def test_two_disks_revert_to_one_instant(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", "raw")
    qcow2, raw = g.disks["xvda"][0], g.disks["xvdb"][0]
    for live in (False, True):
        name = f"both-{'live' if live else 'paused'}"
        t = take(g, name, live=live)
        methods = {d.vdev: d.method for d in t.snap.disks}
        assert methods == {"xvda": INTERNAL, "xvdb": EXTERNAL}, "default methods: qcow2 internal, raw external"
        assert name in tags(qcow2)
        copy = Path(t.snap.path) / "xvdb.raw"
        assert copy.is_file()
        run_on(g)
        seen = revert_and_check(g, t)
        assert seen.first_ok("vda") == seen.first_ok("vdb"), "the two disks came back from different instants"
        assert guestprobe.disk_counter(copy, "raw") == seen.first_ok("vdb")
        assert disk_target(g, "xvdb") == str(raw)
        run_on(g, 1.0)
    assert not bad_lines(g)


# ====================================================================== 3


@pytest.mark.slow
@pytest.mark.parametrize("method", [INTERNAL, EXTERNAL], ids=["internal", "external"])
def test_revert_again_and_between_two_snapshots(agent: Agent, boot_guest: BootGuest, method: int) -> None:
    g = boot_guest("qcow2")
    image = g.disks["xvda"][0]
    s1 = take(g, "s1", method=method)
    run_on(g)
    s2 = take(g, "s2", method=method)
    assert s2.snap.parent == "s1"
    run_on(g)

    back1 = revert_and_check(g, s1, oks=1)
    on_s1 = disk_target(g)
    run_on(g, 1.5)
    again1 = revert_and_check(g, s1, oks=1)
    assert again1.first_ok("vda") == back1.first_ok("vda")
    if method == EXTERNAL:
        assert disk_target(g) != on_s1, "each revert gets a fresh overlay"
    run_on(g, 1.5)
    back2 = revert_and_check(g, s2)
    assert back2.first_counter > again1.first_counter + 10

    if method == INTERNAL:
        assert disk_target(g) == str(image)
        assert {"s1", "s2"} <= set(tags(image))
    else:
        s1_overlay = Path(s1.snap.path) / "xvda.qcow2"
        # s2 froze the overlay s1 created; neither the reverts to s1 nor the
        # guest's writes after them touched it.
        assert s2.snap.disks[0].image == str(s1_overlay)
        assert guestprobe.disk_counter(image, "qcow2") == back1.first_ok("vda")
        assert guestprobe.disk_counter(s1_overlay, "qcow2") == back2.first_ok("vda")
        now = disk_target(g)
        assert Path(now).parent == Path(s2.snap.path)
        assert img_info(now)["full-backing-filename"] == str(s1_overlay)
        # No orphans: of the overlays the domain ran on, only the one s2
        # froze and the one it runs on now are left.
        overlays = {p for s in (s1, s2) for p in Path(s.snap.path).glob("*.qcow2")}
        assert overlays == {s1_overlay, Path(now)}, sorted(map(str, overlays))
    # Both still listed, s2 current.
    listed = agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots
    assert [(s.name, s.current) for s in listed] == [("s1", False), ("s2", True)]
    assert not bad_lines(g)


# ====================================================================== 4


def _settled_counter(g: Guest) -> int:
    """The counter of a paused guest, once its last line is out."""
    c = g.counter()
    time.sleep(0.3)
    assert g.counter() == c, "the counter moved while the domain was paused"
    return c


@pytest.mark.slow
def test_paused_domain_snapshots_revert_paused_unless_told(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    stub = agent.stub()
    stub.PauseDomain(pb.PauseDomainRequest(domain_name=g.name), timeout=30)
    c = _settled_counter(g)
    paused_at = g.mark()

    for name in ("p1", "p2"):  # the second one while the domain is still paused
        events = g.create_snapshot(name=name)
        snap = check_stream(events, CREATE, {"memory", "disks"}).result
        assert snap.state == PAUSED
        assert g.domain().state == PAUSED, f"the domain runs again after snapshot {name} of it paused"
    assert guestprobe.serial_counters(g.serial, paused_at) == [], "the guest ran during the snapshots"

    # Unpaused, the guest goes on where it stopped, disks in step.
    stub.UnpauseDomain(pb.UnpauseDomainRequest(domain_name=g.name), timeout=30)
    guestprobe.wait_disk_ok(g.serial, "vda", count=2, offset=paused_at, timeout=15)
    assert guestprobe.serial_counters(g.serial, paused_at)[0] == c + 1
    assert not bad_lines(g, paused_at), bad_lines(g, paused_at)
    assert g.domain().state == RUNNING
    run_on(g)

    # Reverted, it is paused as it was at the snapshot: frozen.
    check_stream(g.revert("p1"), REVERT, REVERT_PHASES)
    assert g.domain().state == PAUSED
    reverted_at = g.mark()
    time.sleep(1.2)
    assert g.domain().state == PAUSED
    assert guestprobe.serial_counters(g.serial, reverted_at) == [], "a domain reverted to a paused snapshot ran"

    # --running overrides the snapshot's state; the guest goes on from c.
    t = Taken(agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="p2"), timeout=30), c, c)
    out: list[subprocess.CompletedProcess[str]] = []
    seen = revert_and_check(g, t, do=lambda: out.append(agent.cli("snapshot-revert", g.name, "p2", "--running",
                                                                  check=True)))
    assert seen.first_counter == c + 1
    assert "reverted to snapshot p2" in out[0].stdout

    # And the API's field does the same on p1.
    run_on(g)
    p1 = agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="p1"), timeout=30)
    seen = revert_and_check(g, Taken(p1, c, c), run_state=pb.RUN_STATE_AFTER_REVERT_RUNNING)
    assert seen.first_counter == c + 1
    assert not bad_lines(g)


# ====================================================================== 5


def test_running_domain_keeps_running_through_creates(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    offset = g.mark()
    for live in (False, True):
        c_before = g.counter()
        events = g.create_snapshot(live=live) if not live else g.create_snapshot(live=live, name="live-one")
        snap = check_stream(events, CREATE, CREATE_PHASES).result
        if not live:
            assert re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z", snap.name), f"default name {snap.name!r} is not the UTC time"
        assert snap.state == RUNNING
        assert snap.downtime.ToNanoseconds() / 1e9 > 0
        d = g.domain()
        assert d.state == RUNNING
        assert d.busy_with_operation == ""
        guestprobe.wait_counter_above(g.serial, c_before + 10, timeout=10)
    # Paused briefly, never restarted: one counter after the other.
    counters = guestprobe.serial_counters(g.serial, offset)
    assert counters == list(range(counters[0], counters[0] + len(counters))), counters
    assert "READY" not in g.lines_since(offset)
    assert not bad_lines(g)


# ====================================================================== 6


@dataclass(frozen=True)
class Before:
    files: set[str]
    guest_files: set[str]
    tags: list[str]
    targets: list[tuple[str, str]]
    snapshots: list[str]


def _state(agent: Agent, g: Guest) -> Before:
    d = g.domain()
    listed = agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots
    return Before(tree(agent.snapshot_root), tree(g.folder) - {"serial.log"}, tags(g.disks["xvda"][0]),
                  [(x.vdev, x.target) for x in d.disks], [s.name for s in listed])


def _refused(agent: Agent, code: grpc.StatusCode, **fields: Any) -> str:
    req = pb.CreateSnapshotRequest(request_id=uuid.uuid4().hex, **fields)
    with pytest.raises(grpc.RpcError) as err:
        list(agent.stub().CreateSnapshot(req, timeout=60))
    assert err.value.code() == code, (err.value.code(), err.value.details())
    details = err.value.details() or ""
    assert details
    return details


_PROGRESS_LINE = re.compile(r"\d\d:\d\d:\d\d (operation [0-9a-f]+: .*|[a-z]+ \d+%( .*)?)")


def _cli_refused(agent: Agent, *args: str) -> str:
    """Exit 1 and one `domsnap: ` line, the last on stderr; returns it.

    (Refusals that the agent finds once the operation started are preceded
    by its progress lines: see test_refused_create_prints_only_the_error.)
    """
    out = agent.cli(*args)
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    *before, last = out.stderr.splitlines()
    assert last.startswith("domsnap: ") and out.stderr.endswith("\n"), out.stderr
    assert all(_PROGRESS_LINE.fullmatch(line) for line in before), out.stderr
    assert out.stdout == ""
    return last


def test_bad_requests_are_refused_and_touch_nothing(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2", "raw")
    existing = tmp_path / "already-here"
    existing.mkdir()
    bad_disk = tmp_path / "bad-disk.cfg"
    bad_disk.write_text("disks=['/x/y.qcow2,qcow2,xvdz']\n")
    bad_key = tmp_path / "bad-key.cfg"
    bad_key.write_text('name="k"\nfrobnicate=1\n')
    counter = g.counter()

    domdir = agent.snapshot_root / g.name

    def untouched(before: Before, what: str) -> None:
        after = _state(agent, g)
        assert after.files == before.files, (
            f"{what}: left {sorted(after.files - before.files)} in the snapshot root")
        assert before.files <= after.files, f"{what}: removed {sorted(before.files - after.files)}"
        assert after.guest_files == before.guest_files, f"{what}: left {sorted(after.guest_files ^ before.guest_files)}"
        assert after.tags == before.tags, f"{what}: tags {after.tags}"
        assert after.targets == before.targets, f"{what}: the domain moved to {after.targets}"
        assert after.snapshots == before.snapshots, f"{what}: snapshots {after.snapshots}"
        d = g.domain()
        assert (d.state, d.busy_with_operation) == (RUNNING, ""), what

    # On a domain without any snapshot yet: nothing may appear under the root,
    # not even the domain's directory.
    cases: list[tuple[str, grpc.StatusCode, dict[str, Any], tuple[str, ...], str]] = [
        ("internal on raw", grpc.StatusCode.INVALID_ARGUMENT, {"name": "int", "method": INTERNAL},
         ("snapshot-create", g.name, "--name", "int", "--internal"), "xvdb"),
        ("slash in name", grpc.StatusCode.INVALID_ARGUMENT, {"name": "a/b"},
         ("snapshot-create", g.name, "--name", "a/b"), "invalid snapshot name"),
        ("space in name", grpc.StatusCode.INVALID_ARGUMENT, {"name": "a b"},
         ("snapshot-create", g.name, "--name", "a b"), "invalid snapshot name"),
        ("cfg names xvdz", grpc.StatusCode.INVALID_ARGUMENT,
         {"name": "z", "config": bad_disk.read_text()},
         ("snapshot-create", g.name, "--name", "z", str(bad_disk)), "xvdz"),
        ("cfg unknown key", grpc.StatusCode.INVALID_ARGUMENT, {"config": bad_key.read_text()},
         ("snapshot-create", g.name, str(bad_key)), "frobnicate"),
        ("existing path", grpc.StatusCode.ALREADY_EXISTS, {"name": "ex", "path": str(existing)},
         ("snapshot-create", g.name, "--name", "ex", str(existing)), str(existing)),
    ]
    for what, code, fields, argv, words in cases:
        before = _state(agent, g)
        assert words in _refused(agent, code, domain_name=g.name, **fields), what
        untouched(before, what)
        assert words in _cli_refused(agent, *argv), what
        untouched(before, what + " (CLI)")
    assert not domdir.exists() or not any(domdir.iterdir())

    before = _state(agent, g)
    assert "does not exist" in _refused(agent, grpc.StatusCode.NOT_FOUND, domain_name="no-such-domain", name="n")
    assert "does not exist" in _cli_refused(agent, "snapshot-create", "no-such-domain", "--name", "n")
    untouched(before, "unknown domain")
    assert not (agent.snapshot_root / "no-such-domain").exists()

    # A duplicate name needs a first snapshot.
    take(g, "dup", align=False)
    before = _state(agent, g)
    assert "dup" in _refused(agent, grpc.StatusCode.ALREADY_EXISTS, domain_name=g.name, name="dup")
    untouched(before, "duplicate name")
    assert "dup" in _cli_refused(agent, "snapshot-create", g.name, "--name", "dup", "--external")
    untouched(before, "duplicate name (CLI)")
    # A path that exists is refused as well once the domain's directory exists.
    assert "exists" in _refused(agent, grpc.StatusCode.ALREADY_EXISTS, domain_name=g.name, name="ex2",
                                path=str(existing))
    untouched(before, "existing path")

    guestprobe.wait_counter_above(g.serial, counter + 5, timeout=10)
    assert not bad_lines(g)


def test_refused_create_leaves_no_domain_directory(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2", "raw")
    domdir = agent.snapshot_root / g.name
    taken = tmp_path / "taken"
    taken.write_text("")
    cases: list[tuple[str, grpc.StatusCode, dict[str, Any]]] = [
        ("--internal on a raw disk", grpc.StatusCode.INVALID_ARGUMENT, {"method": INTERNAL}),
        ("cfgfile naming xvdz", grpc.StatusCode.INVALID_ARGUMENT, {"config": "disks=['/x/y.qcow2,qcow2,xvdz']"}),
        ("cfgfile disk file exists", grpc.StatusCode.ALREADY_EXISTS, {"config": f"disks=['{taken},qcow2,xvda']"}),
        ("cfgfile memory_path exists", grpc.StatusCode.ALREADY_EXISTS, {"config": f'memory_path="{taken}"'}),
    ]
    leaked = []
    for what, code, fields in cases:
        _refused(agent, code, domain_name=g.name, name="n", **fields)
        if domdir.exists():
            leaked.append(what)
            domdir.rmdir()
    assert leaked == [], f"refused creates left {domdir} behind: {leaked}"


def test_refused_create_prints_only_the_error(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("raw")
    out = agent.cli("snapshot-create", g.name, "--name", "n", "--internal")
    assert out.returncode == 1
    assert out.stderr.startswith("domsnap: ") and out.stderr.count("\n") == 1, out.stderr


# ====================================================================== 7


def test_second_create_on_a_busy_domain_is_refused_at_once(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", memory=512)
    stub = agent.stub()
    first = stub.CreateSnapshot(pb.CreateSnapshotRequest(
        request_id=uuid.uuid4().hex, domain_name=g.name, name="first", live=True), timeout=300)
    started = next(first)
    assert started.WhichOneof("event") == "started"
    op_id = started.started.id

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.CreateSnapshot(pb.CreateSnapshotRequest(
            request_id=uuid.uuid4().hex, domain_name=g.name, name="second"), timeout=60))
    refused_at = time.time()
    assert time.monotonic() - t0 < 5, "the second create was not refused at once"
    assert err.value.code() == grpc.StatusCode.ABORTED, (err.value.code(), err.value.details())
    assert op_id in (err.value.details() or ""), err.value.details()

    rest = [started, *first]
    finished = check_stream(rest, CREATE, {"memory", "disks"})
    assert finished.finished_at.ToNanoseconds() / 1e9 > refused_at, "the first create was over before the second"
    assert [s.name for s in stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots] == [
        "first"]
    assert not (agent.snapshot_root / g.name / "second").exists()
    assert tags(g.disks["xvda"][0]) == ["first"]
    assert g.domain().state == RUNNING


# ====================================================================== 8


@pytest.mark.slow
def test_cli_round_trip(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2")

    wait_tick(g)
    c_before = g.counter()
    out = agent.cli("snapshot-create", g.name, "--name", "X", check=True)
    x = Taken(agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="X"), timeout=30),
              c_before, g.counter())
    # Each line starts with its time.
    progress = [line.split(" ", 1)[1] for line in out.stderr.splitlines()]
    assert re.fullmatch(r"operation [0-9a-f]+: create-snapshot \S+ X", progress[0]), progress
    assert "\r" not in out.stderr and "\x1b" not in out.stderr, "a bar on a non-tty"
    phases = [line.split()[0] for line in progress[1:]]
    assert {"memory", "disks"} <= set(phases), progress
    assert all(re.fullmatch(r"\S+ \d+%( .*)?", line) for line in progress[1:]), progress
    assert out.stdout.startswith(f"Snapshot X of {g.name} created at {agent.snapshot_root / g.name / 'X'}")

    out = agent.cli("--json", "snapshot-create", g.name, "--name", "Y", check=True)
    objs = [json.loads(line) for line in out.stdout.splitlines()]
    assert list(objs[0]) == ["started"] and objs[0]["started"]["id"]
    assert all(list(o) == ["progress"] for o in objs[1:-1])
    assert list(objs[-1]) == ["finished"]
    assert objs[-1]["finished"]["state"] == "succeeded"
    assert objs[-1]["finished"]["result"]["name"] == "Y"
    assert out.stderr == ""

    def current_in_list() -> dict[str, bool]:
        rows = agent.cli("snapshot-list", g.name, check=True).stdout.splitlines()
        assert rows[0].split()[:2] == ["Domain", "Name"]
        return {r.split()[1]: r.rstrip().endswith("*") for r in rows[1:]}

    assert current_in_list() == {"X": False, "Y": True}

    info = agent.cli("snapshot-info", g.name, "X", check=True).stdout
    assert re.search(r"^Name\s+: X$", info, re.M), info
    assert re.search(r"^\s+xvda\s+qcow2\s+qcow2\s+internal\s", info, re.M), info

    run_on(g)
    revert_and_check(g, x, do=lambda: agent.cli("snapshot-revert", g.name, "X", check=True))
    assert current_in_list() == {"X": True, "Y": False}

    cfg = tmp_path / "snap.cfg"
    cfg.write_text("name=\"fromcfg\"\ndescription=\"d\"\ndisks=[',,xvda']\n")
    out = agent.cli("snapshot-create", g.name, str(cfg), check=True)
    assert "Snapshot fromcfg of" in out.stdout
    snap = agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="fromcfg"), timeout=30)
    assert (snap.name, snap.description) == ("fromcfg", "d")
    assert [(d.vdev, d.method, d.tag) for d in snap.disks] == [("xvda", INTERNAL, "fromcfg")]
    assert "fromcfg" in tags(g.disks["xvda"][0])
    assert not bad_lines(g)


# ====================================================================== copy after resume

MiB = 1 << 20
COPY_DATA_MIB = 1536


def _fill(image: Path, start_mib: int, mib: int) -> None:
    """Data the guest never touches (it writes sector 0 only), enough to make
    copying the image take seconds: one random block, repeated."""
    block = os.urandom(MiB)
    with open(image, "r+b") as f:
        f.seek(start_mib * MiB)
        for _ in range(mib):
            f.write(block)


def _same_beyond_first_mib(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(MiB)
        fb.seek(MiB)
        while True:
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


@pytest.mark.slow
def test_raw_copy_after_resume_holds_the_instant_while_the_guest_writes_on(agent: Agent,
                                                                            boot_guest: BootGuest) -> None:
    """The raw image is copied after the guest resumed (its writes meanwhile
    held aside, then merged back): the copy holds the instant's sector 0,
    not the later one the guest wrote during the copy, and all the rest."""
    g = boot_guest("raw", disk_mib=COPY_DATA_MIB + 2)
    image = g.disks["xvda"][0]
    _fill(image, 1, COPY_DATA_MIB)
    wrote_during_copy = False
    for live in (False, True):
        name = f"big-{'live' if live else 'paused'}"
        t = take(g, name, live=live)
        copy = Path(t.snap.path) / "xvda.raw"
        later = guestprobe.disk_counter(image, "raw")
        at_instant = guestprobe.disk_counter(copy, "raw")
        assert later is not None and at_instant is not None
        wrote_during_copy |= later > at_instant
        assert disk_target(g) == str(image), "the domain must be back on its own image"
        assert not list(Path(t.snap.path).glob(".*")), "the overlay that held the guest's writes is left behind"
        assert _same_beyond_first_mib(copy, image)
        run_on(g)
        seen = revert_and_check(g, t)
        assert seen.first_ok("vda") == at_instant
        run_on(g, 1.0)
    assert wrote_during_copy, "the guest never wrote while its image was copied: the test proves nothing"
    assert not bad_lines(g)

    # Cancelled mid-copy: rolled back, the guest's writes since the instant merged back into its image.
    stub = agent.stub()
    stream = stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name=g.name, name="cut", live=True,
                                                          request_id=uuid.uuid4().hex), timeout=300)
    first = next(stream)
    for ev in stream:
        if ev.WhichOneof("event") == "progress" and "copying" in ev.progress.message and ev.progress.bytes_done:
            break
    stub.CancelOperation(pb.CancelOperationRequest(operation_id=first.started.id), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert not (agent.snapshot_root / g.name / "cut").exists()
    assert disk_target(g) == str(image)
    mark = g.mark()
    guestprobe.wait_disk_ok(g.serial, "vda", count=2, offset=mark, timeout=20)
    assert not bad_lines(g)


@pytest.mark.slow
def test_raw_copy_of_a_paused_domain(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("raw")
    image = g.disks["xvda"][0]
    agent.stub().PauseDomain(pb.PauseDomainRequest(domain_name=g.name), timeout=30)
    paused_at = g.mark()
    snap = check_stream(g.create_snapshot(name="p"), CREATE, {"memory", "disks"}).result
    assert g.domain().state == PAUSED
    assert disk_target(g) == str(image)
    copy = Path(snap.path) / "xvda.raw"
    assert guestprobe.disk_counter(copy, "raw") == guestprobe.disk_counter(image, "raw")
    assert guestprobe.serial_counters(g.serial, paused_at) == [], "the guest ran during the snapshot"
    agent.stub().UnpauseDomain(pb.UnpauseDomainRequest(domain_name=g.name), timeout=30)
    guestprobe.wait_disk_ok(g.serial, "vda", count=2, offset=paused_at, timeout=15)
    assert not bad_lines(g, paused_at)


# ====================================================================== chains merge back


def chain_of(image: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", image], capture_output=True,
                         text=True, timeout=30, check=True)
    return [d["filename"] for d in json.loads(out.stdout)]


def delete(g: Guest, name: str) -> None:
    stub = g.agent.stub()
    events = list(stub.DeleteSnapshot(pb.DeleteSnapshotRequest(domain_name=g.name, snapshot_name=name,
                                                               request_id=uuid.uuid4().hex), timeout=300))
    assert events[-1].finished.error.code == 0, events[-1]


@pytest.mark.slow
def test_keeping_one_of_six_external_snapshots_merges_the_chain_back(agent: Agent, boot_guest: BootGuest) -> None:
    """Six external snapshots of a running guest, five deleted (in a mixed
    order: layers inside the running chain), then the newest one (the
    domain's own top layer): the chain is back to two images and the kept
    snapshot reverts to its exact instant."""
    g = boot_guest("qcow2")
    base = str(g.disks["xvda"][0])
    taken = {}
    for i in range(1, 7):
        taken[f"s{i}"] = take(g, f"s{i}", live=True, method=EXTERNAL)
    assert len(chain_of(disk_target(g))) == 7
    for name in ("s3", "s1", "s5", "s2", "s4"):
        delete(g, name)
        assert not (agent.snapshot_root / g.name / name).exists(), f"{name}: its files stay"
    chain = chain_of(disk_target(g))
    assert chain == [str(agent.snapshot_root / g.name / "s6" / "xvda.qcow2"), base], chain
    kept = agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="s6"), timeout=30)
    assert kept.disks[0].image == base, "the kept snapshot must name the image its layer was merged into"

    take(g, "s7", live=True, method=EXTERNAL)
    delete(g, "s7")
    assert chain_of(disk_target(g)) == chain, "the newest layer must be merged back into the one below"

    run_on(g)
    revert_and_check(g, taken["s6"])
    assert len(chain_of(disk_target(g))) <= 3
    assert not bad_lines(g)


@pytest.mark.slow
def test_a_layer_is_not_merged_where_a_chain_branches(agent: Agent, boot_guest: BootGuest) -> None:
    """a froze the base image, b froze a's layer; reverted to a, the domain
    reads the base through a new layer while b reads it through a's layer:
    deleting a must not merge its layer into the base (the domain's branch
    would change under it), and b stays exact."""
    g = boot_guest("qcow2")
    base = str(g.disks["xvda"][0])
    a = take(g, "a", live=True, method=EXTERNAL)
    b = take(g, "b", live=True, method=EXTERNAL)
    run_on(g, 1.0)
    revert_and_check(g, a)
    delete(g, "a")
    layer = b.snap.disks[0].image
    assert Path(layer).is_file() and chain_of(layer) == [layer, base], "b's frozen image must stay as it was"
    assert chain_of(disk_target(g))[1:] == [base]
    run_on(g, 1.0)
    revert_and_check(g, b)
    assert not bad_lines(g)
