"""README.md's controller example, taken from the README itself (so the two
cannot drift) and run as it is against a real agent with a real guest, and
one agent that is not there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import Guest, destroy_all, start_guest

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.guest


def example() -> str:
    """The first ```python block of the section "## The client library"."""
    section = README.read_text().split("\n## The client library\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert match is not None, "README.md: no python example under '## The client library'"
    return match.group(1)


@pytest.fixture
def fresh_agent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    """An agent of its own: the example snapshots the first running domain it finds."""
    a = Agent(tmp_path_factory.mktemp("readme"), config_toml=f'[qemu]\naccel = "{accel}"\n')
    a.start()
    yield a
    a.stop()


@pytest.fixture
def guest(fresh_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[Guest]:
    g = start_guest(fresh_agent, guest_image, tmp_path, "qcow2")
    yield g
    destroy_all(fresh_agent, [g])


def test_readme_controller_example_runs(fresh_agent: Agent, guest: Guest, tmp_path: Path) -> None:
    gone = f"unix:{tmp_path}/gone.sock"
    env = {**os.environ, "DOMSNAP_HOST": f"{fresh_agent.address},{gone}"}
    proc = subprocess.run([sys.executable, "-c", example()], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{fresh_agent.address}: {guest.name}"
    assert lines[1] == (f"{gone}: failed: cannot reach the agent at {gone}: No such file or directory. Is domsnapd "
                        "running there (systemctl start domsnapd)? Another agent: -H ADDR or $DOMSNAP_HOST")
    assert any(re.fullmatch(r" {2}PHASE_(MEMORY|DISKS) \d+%", line) for line in lines), lines
    made = re.fullmatch(rf"{guest.name}: snapshot (\S+) in (\S+), guest paused \d+ ms", lines[-2])
    assert made is not None, lines
    assert lines[-1] == f"{guest.name}: back at {made[1]}"
    # Really made, and really reverted to.
    stub = fresh_agent.stub()
    snap = stub.GetSnapshot(pb.GetSnapshotRequest(domain_name=guest.name, snapshot_name=made[1]), timeout=30)
    assert snap.path == made[2] and snap.current
    listed = stub.ListOperations(pb.ListOperationsRequest(domain_name=guest.name), timeout=30).operations
    kinds = [op.kind for op in listed]
    assert sorted(kinds) == [pb.OPERATION_KIND_CREATE_SNAPSHOT, pb.OPERATION_KIND_REVERT_SNAPSHOT]
    assert guest.domain().state == pb.DOMAIN_STATE_RUNNING
