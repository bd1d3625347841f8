"""The `domsnap` CLI as people use it, through a real agent and guest: one
meaning per word, refusals that name their way out, results that say what
happened, the commands xl and virsh users reach for, and output fit for a
terminal, a pipe and a program."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import BIN
from tests.integration.conftest import Agent, BootGuest, Guest, destroy_all, start_guest

pytestmark = [pytest.mark.guest]


@pytest.fixture
def slow_guest(slow_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[Guest]:
    g = start_guest(slow_agent, guest_image, tmp_path, "qcow2")
    yield g
    destroy_all(slow_agent, [g])


def cli(agent: Agent, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "domsnap"), "-H", agent.address, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def ok(agent: Agent, *args: str, **kw: object) -> str:
    out = cli(agent, *args, **kw)  # type: ignore[arg-type]
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def names(agent: Agent, domain: str, *filters: str) -> list[str]:
    return [s["name"] for s in json.loads(ok(agent, "--json", "snapshot-list", domain, *filters))]


@pytest.mark.slow
def test_results_and_the_commands_people_reach_for(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2")
    name = g.name

    # One meaning per word: a bare word is neither a path nor a name.
    out = cli(agent, "snapshot-create", name, "foo", cwd=tmp_path)
    assert out.returncode == 2 and "--name foo" in out.stderr and "./foo" in out.stderr, out.stderr
    out = cli(agent, "snapshot-create", name, "missing.cfg", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (1, "domsnap: missing.cfg: no such file (a <cfgfile> must exist)\n")
    assert list(tmp_path.iterdir()) == [tmp_path / g.name] and names(agent, name) == []

    # A dry run prints the plan and touches nothing.
    plan = ok(agent, "snapshot-create", name, "--name", "a", "--dry-run")
    assert plan.startswith(f"Dry run, nothing touched: create-snapshot {name} a\n"), plan
    assert re.search(r"^  xvda +internal +qcow2 +\S+xvda\.qcow2 +a$", plan, re.M), plan
    assert names(agent, name) == [] and not (agent.snapshot_root / name / "a").exists()

    ok(agent, "snapshot-create", name, "--name", "a", "--description", "first")
    ok(agent, "pause", name)
    ok(agent, "snapshot-create", name, "--name", "pz")
    ok(agent, "unpause", name)
    ok(agent, "snapshot-create", name, "--name", "c1")

    # snapshot-list's filters, snapshot-current, snapshot-edit, snapshot-dumpmanifest.
    assert names(agent, name, "--roots") == ["a"]
    assert names(agent, name, "--leaves") == ["c1"]
    assert names(agent, name, "--parent", "a") == ["pz"]
    assert names(agent, name, "--name", "p*") == ["pz"]
    assert re.search(r"^Name +: c1$", ok(agent, "snapshot-current", name), re.M)
    assert re.search(r"^Description +: changed$", ok(agent, "snapshot-edit", name, "a", "--description", "changed"),
                     re.M)
    manifest = json.loads(ok(agent, "snapshot-dumpmanifest", name, "a"))
    assert (manifest["name"], manifest["description"], manifest["format"]) == ("a", "changed", "domsnap.snapshot")

    # A revert says the state and the new domid, and how to run a paused domain.
    before = g.domain().domid
    plan = ok(agent, "snapshot-revert", name, "pz", "--dry-run")
    assert re.search(r"^Leaves the domain +: paused$", plan, re.M) and re.search(r"^Risks +: none$", plan, re.M)
    assert g.domain().domid == before and g.domain().state == pb.DOMAIN_STATE_RUNNING
    result = ok(agent, "snapshot-revert", name, "pz")
    domid = g.domain().domid
    assert domid != before and g.domain().state == pb.DOMAIN_STATE_PAUSED
    assert result.endswith(f"; it is paused, domid {domid} (run it: domsnap -H {agent.address} unpause {name})\n")
    assert "reverted to snapshot pz" in ok(agent, "snapshot-revert", name, "--current", "--running")
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING

    # --children: the dry run and the result name every descendant.
    plan = ok(agent, "snapshot-delete", name, "pz", "--children", "--dry-run")
    assert re.search(r"^Deletes +: c1, pz$", plan, re.M), plan
    assert names(agent, name) == ["a", "pz", "c1"]
    deleted = ok(agent, "snapshot-delete", name, "pz", "--children")
    assert deleted.startswith(f"Snapshot pz of {name} deleted, and its descendants c1 ("), deleted

    # Case 2: operations and watch still answer once their snapshots are gone.
    ops = json.loads(ok(agent, "--json", "operations", name))
    assert {op["state"] for op in ops} == {"succeeded"}, ops
    assert {op["kind"] for op in ops} >= {"create-snapshot", "revert-snapshot", "delete-snapshot"}
    created_c1 = next(op["id"] for op in ops if op["snapshot"] == "c1" and op["kind"] == "create-snapshot")
    assert f"Snapshot c1 of {name} created" in ok(agent, "watch", created_c1)

    # Units and times: ms below a second; local times with their zone, as TZ says; --utc.
    info = ok(agent, "snapshot-info", name, "a", env={"TZ": "Asia/Tokyo"})
    assert re.search(r"^Guest paused +: \d+ ms$", info, re.M), info
    assert re.search(r"^Created +: \S+ \S+ JST$", info, re.M), info
    assert re.search(r"^Created +: \S+ \S+ UTC$", ok(agent, "--utc", "snapshot-info", name, "a"), re.M)
    assert "  -" in ok(agent, "list", name).splitlines()[1]  # not busy

    # Rename where the disks allow: an external snapshot, not a qcow2 tag.
    ok(agent, "snapshot-create", name, "--name", "e1", "--external")
    assert re.search(r"^Name +: e2$", ok(agent, "snapshot-edit", name, "e1", "--rename", "e2"), re.M)
    assert names(agent, name) == ["a", "e2"] and names(agent, name, "--leaves") == ["e2"]
    out = cli(agent, "snapshot-edit", name, "a", "--rename", "b")
    assert out.returncode == 1 and "cannot be renamed: its disks hold the name" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_busy_domain_names_its_operation(slow_agent: Agent, slow_guest: Guest) -> None:
    g = slow_guest
    first = slow_agent.stub().CreateSnapshot(pb.CreateSnapshotRequest(
        request_id=uuid.uuid4().hex, domain_name=g.name, name="first"), timeout=300)
    op_id = next(first).started.id
    out = cli(slow_agent, "snapshot-create", g.name, "--name", "second")
    busy = ok(slow_agent, "list", g.name).splitlines()[1]
    assert list(first)[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED
    assert out.returncode == 1, out.stderr
    assert f"wait for it (domsnap watch {op_id}) or stop it (domsnap cancel {op_id})" in out.stderr
    assert busy.endswith(f"  {op_id}"), busy


def test_refusals_name_their_way_out(agent: Agent, boot_guest: BootGuest, tmp_path: Path) -> None:
    g = boot_guest("qcow2")

    # JSON errors under --json; the file's name in a config error; did you mean; -H PATH.
    out = cli(agent, "--json", "snapshot-info", g.name, "nope")
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"]["code"] == "NOT_FOUND", out.stdout
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = \n')
    out = cli(agent, "create", str(bad))
    assert out.returncode == 1 and f"{bad}:2:" in out.stderr, out.stderr
    out = cli(agent, "snapshot-lst")
    assert out.returncode == 2 and "did you mean 'snapshot-list'?" in out.stderr, out.stderr
    assert subprocess.run([str(BIN / "domsnap"), "-H", str(agent.sock), "list"], capture_output=True,
                          timeout=60).returncode == 0
    out = cli(agent, "watch", "741bc")
    assert (out.returncode, out.stderr) == (1, "domsnap: operation '741bc' is unknown (finished long ago, or "
                                               "never existed)\n")

    # An agent that is not there: what to start, or which other agent to name.
    gone = subprocess.run([str(BIN / "domsnap"), "-H", f"unix:{tmp_path}/none.sock", "list"], capture_output=True,
                          text=True, timeout=60)
    assert gone.stderr.endswith("Is domsnapd running there (systemctl start domsnapd)? Another agent: -H ADDR or "
                                "$DOMSNAP_HOST\n"), gone.stderr

    # qcow2: a tag in an image later snapshots froze says what to do instead.
    ok(agent, "snapshot-create", g.name, "--name", "i1", "--internal")
    ok(agent, "snapshot-create", g.name, "--name", "e1", "--external")
    out = cli(agent, "snapshot-revert", g.name, "i1")
    assert out.returncode == 1 and "Revert to one of those instead, or delete them first" in out.stderr, out.stderr


def piped_progress(out: subprocess.CompletedProcess[str]) -> list[tuple[int, str, int]]:
    """(seconds of the day, phase, percent) of each progress line a create
    printed to a pipe, after checking they all are plain and timestamped."""
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stderr and "\r" not in out.stderr
    lines = out.stderr.splitlines()
    stamped = [re.fullmatch(r"(\d\d):(\d\d):(\d\d) (\w+) (\d+)%.*", line) for line in lines[1:]]
    assert re.match(r"\d\d:\d\d:\d\d operation ", lines[0]) and all(stamped), lines
    shown = [(int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]), m[4], int(m[5])) for m in stamped if m]
    # The phases in the order they happen, each once, the percentage never
    # going back (memory was once reported twice, around the disks: memory
    # 5 %, disks 8 %, memory 95 %).
    assert [phase for phase, _ in itertools.groupby(p for _, p, _ in shown)] == [
        "validate", "memory", "disks", "manifest", "done"], lines
    assert [pct for _, _, pct in shown] == sorted(pct for _, _, pct in shown) and shown[-1][2] == 100, lines
    # Within a phase, a line per 5 s at most (the stamps are whole seconds).
    assert all(b[0] - a[0] >= 4 for a, b in itertools.pairwise(shown) if a[1] == b[1]), lines
    return shown


def test_piped_and_dumb_terminal_progress(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("raw")
    for name, *live in (["p1"], ["p2", "--live"]):
        piped_progress(cli(agent, "snapshot-create", g.name, "--name", name, *live, env={"TERM": "dumb"}))


@pytest.mark.slow
def test_piped_progress_of_a_long_phase(slow_agent: Agent, slow_guest: Guest) -> None:
    shown = piped_progress(cli(slow_agent, "snapshot-create", slow_guest.name, "--name", "long", env={"TERM": "dumb"}))
    memory = [t for t, phase, _ in shown if phase == "memory"]
    # The memory image goes at 8 MB/s: its phase lasts long enough to be
    # shown again, but no oftener than every 5 s.
    assert len(memory) >= 2, shown


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (scripts/setup installs it)")
def test_terminal_shows_the_id_the_bar_and_the_result(slow_agent: Agent, slow_guest: Guest, tmp_path: Path) -> None:
    g = slow_guest
    session = f"domsnap-{uuid.uuid4().hex[:8]}"
    sock = str(tmp_path / "tmux.sock")
    command = f"TERM=xterm {BIN / 'domsnap'} -H {slow_agent.address} snapshot-create {g.name} --name t1; sleep 60"
    _tmux("-S", sock, "new-session", "-d", "-s", session, "-x", "200", "-y", "20", command)
    try:
        screens: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            screens.append(_tmux("-S", sock, "capture-pane", "-p", "-t", session))
            if "created at" in screens[-1]:
                break
            time.sleep(0.05)
        final = [line for line in screens[-1].splitlines() if line.strip()]
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True, timeout=30)
    assert re.fullmatch(rf"operation [0-9a-f]+: create-snapshot {g.name} t1", final[0]), final
    assert re.match(r"\w+ +\[#+-*\] +\d+%", final[1]), final
    assert final[2].startswith(f"Snapshot t1 of {g.name} created at "), final
    # Human units: ms below a second, s above (8 MB/s makes this pause long).
    assert re.search(r"\(\d+\.\d s, guest paused \d+(\.\d s| ms)\)$", final[2]), final
    assert any("ETA " in screen for screen in screens), "no ETA was ever drawn"
