"""examples/node: a controller in another language, built from the .proto
alone (@grpc/grpc-js, @grpc/proto-loader, protobufjs for the error details),
against a real agent over its unix socket: a create streamed, re-attached and
retried with its request id, the change feed followed, the errors' reasons
decoded; and, with grpc-js's keepalive at 10 s, an idle stream kept open for
two minutes (gRPC's default server policy closed it after 40 s with GOAWAY
too_many_pings).

Runs wherever `node` is; scripts/setup installs the npm packages
(`npm ci` in examples/node) when npm is there. Node without them is a
failure, not a skip: setup was not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import BootGuest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE = shutil.which("node")
IDLE_SECONDS = 125

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (examples/node needs Node.js >= 18)")


def argv(*args: str) -> list[str]:
    assert NODE is not None
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node/node_modules is missing: run scripts/setup (it runs npm ci there)")
    return [NODE, str(EXAMPLE / "domsnap.js"), *args]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(*args), capture_output=True, text=True, timeout=300)


def succeeds(*args: str) -> list[str]:
    proc = run(*args)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def fails(*args: str) -> str:
    proc = run(*args)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    return proc.stderr


@pytest.mark.guest
def test_node_controller_creates_reattaches_retries_follows_the_feed_and_reads_error_reasons(
        agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", wait=False)
    addr = agent.address
    assert re.search(rf"^domain {g.name} id=\d+ state=running memory=128MiB vcpus=1$",
                     "\n".join(succeeds(addr, "list")), re.M)
    [token] = succeeds(addr, "token")
    request_id = uuid.uuid4().hex

    lines = succeeds(addr, "create", g.name, "fromnode", "--request-id", request_id)
    started = [line for line in lines if line.startswith("started operation ")]
    assert len(started) == 1 and "CREATE_SNAPSHOT" in started[0] and g.name in started[0]
    op_id = started[0].split()[2]
    phases = [line.split()[1] for line in lines if line.startswith("progress ")]
    assert {"memory", "disks", "done"} <= set(phases), lines
    assert lines[-1].startswith(f"finished succeeded: snapshot fromnode of {g.name} in ")
    snap = agent.stub().GetSnapshot(pb.GetSnapshotRequest(domain_name=g.name, snapshot_name="fromnode"), timeout=30)
    assert f" in {snap.path} " in lines[-1]

    # The same request again (a controller that lost the answer): the first operation, not a second.
    again = succeeds(addr, "create", g.name, "fromnode", "--request-id", request_id)
    assert again[0].startswith(f"started operation {op_id} ") and again[-1] == lines[-1]
    # Re-attached by id.
    watched = succeeds(addr, "watch", op_id)
    assert watched[0].startswith(f"started operation {op_id} ") and watched[-1] == lines[-1]
    # The feed from before the create: the operation's changes and the snapshot, each once.
    feed = succeeds(addr, "events", "--since", token, "--domain", g.name, "--count", "3")
    assert feed[0] == f"watching from {token}"
    assert [re.sub(r"^event \S+ ", "", line) for line in feed[1:]] == [
        f"operation domain={g.name} snapshot=fromnode operation={op_id} running",
        f"operation domain={g.name} snapshot=fromnode operation={op_id} succeeded",
        f"snapshot_created domain={g.name} snapshot=fromnode operation={op_id}"]

    # Error reasons and their metadata, decoded from google.rpc.Status (AIP-193).
    assert f"(NOT_FOUND) reason=SNAPSHOT_NOT_FOUND domain={g.name} snapshot=nosuch" in fails(
        addr, "snapshot", g.name, "nosuch")
    assert "(NOT_FOUND) reason=DOMAIN_NOT_FOUND domain=nosuchdomain" in fails(addr, "snapshot", "nosuchdomain", "x")
    assert "(NOT_FOUND) reason=OPERATION_NOT_FOUND operation_id=nosuchop" in fails(addr, "watch", "nosuchop")
    assert "(INVALID_ARGUMENT) reason=FIELD_REQUIRED field=operation_id" in fails(addr, "watch", "")
    expired = fails(addr, "events", "--since", "0123456789ab-1")
    assert "(OUT_OF_RANGE) reason=EVENTS_EXPIRED since=0123456789ab-1" in expired and "list again" in expired


@pytest.mark.guest
@pytest.mark.slow
def test_node_idle_stream_with_a_10s_keepalive_stays_open_two_minutes(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2", wait=False)
    stub = agent.stub()
    stub.PauseDomain(pb.PauseDomainRequest(domain_name=g.name), timeout=30)  # no guest to spin meanwhile
    with subprocess.Popen(argv(agent.address, "events", "--domain", g.name, "--count", "1"), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "DOMSNAP_KEEPALIVE_MS": "10000"}) as proc:
        try:
            time.sleep(IDLE_SECONDS)
            assert proc.poll() is None, f"the stream ended within {IDLE_SECONDS} s: {proc.communicate()[1]}"
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=g.name), timeout=60)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert (proc.returncode, err) == (0, "")
    assert re.fullmatch(rf"watching from now\nevent \S+ domain_destroyed domain={g.name}\n", out), out


def test_node_client_reports_an_unreachable_agent(tmp_path: Path) -> None:
    proc = run(f"unix:{tmp_path}/none.sock", "list")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"domsnap.js: unix:{tmp_path}/none.sock: ") and "UNAVAILABLE" in proc.stderr
