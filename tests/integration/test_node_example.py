"""examples/node: a client in another language, built from the .proto alone
(@grpc/grpc-js and @grpc/proto-loader), against a real agent over its unix
socket: it lists the domains and streams a create on a real guest to the end.

Runs wherever `node` is; scripts/setup installs the npm packages
(`npm ci` in examples/node) when npm is there. Node without them is a
failure, not a skip: setup was not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import BootGuest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (examples/node needs Node.js >= 18)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node/node_modules is missing: run scripts/setup (it runs npm ci there)")
    return subprocess.run([NODE, str(EXAMPLE / "domsnap.js"), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.guest
def test_node_client_lists_domains_and_streams_a_create(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    proc = run(agent.address, g.name, "fromnode")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.search(rf"^domain {g.name} id=\d+ state=running memory=128MiB vcpus=1$", proc.stdout, re.M), lines
    started = [line for line in lines if line.startswith("started operation ")]
    assert len(started) == 1 and "CREATE_SNAPSHOT" in started[0] and g.name in started[0]
    phases = [line.split()[1] for line in lines if line.startswith("progress ")]
    assert {"memory", "disks", "done"} <= set(phases), lines
    assert lines[-1].startswith(f"finished succeeded: snapshot fromnode of {g.name} in ")
    snap = agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="fromnode"), timeout=30)
    assert f" in {snap.path} " in lines[-1]


def test_node_client_reports_an_unreachable_agent(tmp_path: Path) -> None:
    proc = run(f"unix:{tmp_path}/none.sock")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"domsnap.js: unix:{tmp_path}/none.sock: ") and "UNAVAILABLE" in proc.stderr
