"""A call that reaches the agent while it is still starting (the driver's
probe, here the KVM probe guest of accel = "auto", the re-attach of running
domains, the journal's recovery) waits for the start to finish instead of
racing it: the demo's `create`, answered mid-start, left its domain with two
QMP sessions on a socket that serves one."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc
from testbed.harness import Agent

pytestmark = pytest.mark.guest


def test_a_call_made_while_the_agent_starts_is_answered_once_it_serves(tmp_path: Path) -> None:
    agent = Agent(tmp_path, config_toml='[qemu]\naccel = "auto"\n')
    agent.wait_serving = lambda: None  # type: ignore[method-assign]
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while not agent.sock.exists():
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.01)
        with agent.channel() as ch:
            health = health_pb2_grpc.HealthStub(ch)
            early = health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status
            domsnap_pb2_grpc.SnapshotAgentStub(ch).ListDomains(pb.ListDomainsRequest(), timeout=60)
            after = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        # The probe guest takes about a second here: the first health check saw the start.
        assert early == health_pb2.HealthCheckResponse.NOT_SERVING
        assert after == health_pb2.HealthCheckResponse.SERVING, "ListDomains was answered before the agent served"
    except grpc.RpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}") from err
    finally:
        agent.stop()
