"""Issue 2: the agent, the CLI and the qemu driver on a real guest."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import BIN
from tests.integration.conftest import Agent, BootGuest

pytestmark = pytest.mark.guest


def test_health_and_reflection_name_the_service(agent: Agent) -> None:
    with agent.channel() as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="domsnap.v1.SnapshotAgent"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"domsnap.v1.SnapshotAgent", "grpc.health.v1.Health"} <= services


def test_info_reports_driver_and_qemu_version(agent: Agent) -> None:
    out = agent.cli("--json", "info", check=True)
    info = json.loads(out.stdout)
    assert info["driver"] == "qemu"
    assert info["hypervisor_version"].startswith("QEMU ")
    assert "live" in info["capabilities"]


def test_list_pause_unpause_freeze_and_resume_the_counter(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    listed = agent.cli("list", check=True).stdout
    row = next(line for line in listed.splitlines() if line.startswith(g.name))
    assert row.split()[4] == "r-----"
    assert row.split()[2] == "128"

    agent.cli("pause", g.name, check=True)
    frozen = g.counter()
    time.sleep(1.0)
    assert g.counter() == frozen, "the counter moved while the domain was paused"
    assert g.domain().state == pb.DOMAIN_STATE_PAUSED

    agent.cli("unpause", g.name, check=True)
    guestprobe.wait_counter_above(g.serial, frozen + 5, timeout=10)
    assert g.domain().state == pb.DOMAIN_STATE_RUNNING


def test_an_idle_guest_ticks_at_its_command_line_pace(agent: Agent, boot_guest: BootGuest) -> None:
    """domsnap.tick (the bench's idle domains): a slower counter, the disks still checked."""
    g = boot_guest("qcow2", extra="domsnap.tick=300")  # returns once the guest said DISK ok
    first = g.counter()
    time.sleep(3.0)
    # 10 ticks at most in 3 s (a late tick is never caught up in a burst), against 30 at the default pace.
    assert 1 <= g.counter() - first <= 11


def test_domid_is_accepted_where_a_name_is(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("raw")
    domid = str(g.domain().domid)
    agent.cli("pause", domid, check=True)
    assert g.domain().state == pb.DOMAIN_STATE_PAUSED
    agent.cli("unpause", domid, check=True)


def test_agent_restart_reattaches_to_a_running_guest(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    domid = g.domain().domid
    agent.restart()
    d = g.domain()
    assert (d.domid, d.state) == (domid, pb.DOMAIN_STATE_RUNNING)
    before = g.counter()
    guestprobe.wait_counter_above(g.serial, before + 3, timeout=10)
    # The re-attached QMP session really drives the guest.
    agent.cli("pause", g.name, check=True)
    assert g.domain().state == pb.DOMAIN_STATE_PAUSED
    agent.cli("unpause", g.name, check=True)


def test_destroy_removes_the_domain(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    agent.cli("destroy", g.name, check=True)
    out = agent.cli("pause", g.name)
    assert out.returncode == 1
    assert out.stderr.strip() == f"domsnap: domain {g.name!r} does not exist"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "bad"\nmemory = \n', ":2:10: expected a value"),
        ('name = "bad"\nmemory = 128\ndisk = [ "/nonexistent/x.qcow2,qcow2,xvda" ]\nkernel = "/k"\n',
         "/nonexistent/x.qcow2 does not exist"),
        ('memory = 128\n', "no 'name'"),
        ('name = "a b"\n', "invalid domain name"),
    ],
)
def test_bad_cfgfile_is_refused_and_creates_nothing(agent: Agent, tmp_path: pytest.TempPathFactory, text: str,
                                                    message: str) -> None:
    before = agent.stub().ListDomains(pb.ListDomainsRequest(), timeout=10)
    cfg = tmp_path / "bad.cfg"  # type: ignore[operator]
    cfg.write_text(text)
    out = agent.cli("create", str(cfg))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("domsnap: ")
    assert message in out.stderr
    after = agent.stub().ListDomains(pb.ListDomainsRequest(), timeout=10)
    assert [d.name for d in after.domains] == [d.name for d in before.domains]
    assert not (agent.state_dir / "qemu" / "bad").exists()


def test_unknown_domain_is_not_found(agent: Agent) -> None:
    with pytest.raises(grpc.RpcError) as err:
        agent.stub().PauseDomain(pb.PauseDomainRequest(domain_name="no-such-domain"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unreachable_agent_is_one_clear_line(agent: Agent, tmp_path: pytest.TempPathFactory) -> None:
    gone = Agent(tmp_path)  # type: ignore[arg-type]
    out = gone.cli("list")
    assert out.returncode == 1
    assert out.stderr.startswith(f"domsnap: cannot reach the agent at {gone.address}")


def test_agent_without_its_hypervisor_says_so_and_leaves_no_socket(tmp_path: Path) -> None:
    config = tmp_path / "domsnapd.toml"
    config.write_text('[qemu]\nbinary = "/nonexistent/qemu-system-x86_64"\n')
    sock = tmp_path / "s.sock"
    out = subprocess.run([str(BIN / "domsnapd"), "--config", str(config), "--driver", "qemu",
                          "--listen", f"unix:{sock}", "--state-dir", str(tmp_path / "state"),
                          "--snapshot-root", str(tmp_path / "snaps")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "domsnapd: /nonexistent/qemu-system-x86_64 exited with status 127: "
        "/nonexistent/qemu-system-x86_64: No such file or directory")
    assert "Traceback" not in out.stderr
    assert not sock.exists()
