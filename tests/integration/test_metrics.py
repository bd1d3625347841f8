"""The Prometheus endpoint of a real agent, scraped over its unix socket
after a real create on a real guest (a qcow2 and a raw disk), and on a
loopback TCP port the system picked; the journal's recoveries counted after
the agent was killed in the middle of a create."""

from __future__ import annotations

import re
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from domsnap.agent.journal import KILL_ENV
from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import Guest, destroy_all, own_agent, start_guest

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_unix(path: Path, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: domsnap\r\n\r\n") -> tuple[str, str]:
    """(status line and headers, body) of one request on the metrics socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode(), body.decode()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_agent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    base = tmp_path_factory.mktemp("metrics")
    with own_agent(base, accel, top=f'[metrics]\nlisten = "unix:{base}/metrics.sock"\n',
                   tables="[testing]\nfault_injection = true\n") as a:
        yield a


@pytest.fixture
def guest(metrics_agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[Guest]:
    g = start_guest(metrics_agent, guest_image, tmp_path, "qcow2", "raw")
    yield g
    destroy_all(metrics_agent, [g])


@pytest.mark.guest
def test_a_create_shows_in_the_metrics(metrics_agent: Agent, guest: Guest) -> None:
    sock = metrics_agent.base / "metrics.sock"
    head, body = scrape_unix(sock)
    assert head.startswith("HTTP/1.1 200 OK") and "text/plain" in head
    before = parse(body)
    assert value(before, "domsnap_operations_running", kind="create") == 0
    assert value(before, "domsnap_agent_info", version=metrics_agent_version(), driver="qemu") == 1

    req = pb.CreateSnapshotRequest(domain_name=guest.name, request_id=uuid.uuid4().hex, name="m1")
    during: Samples = {}
    result = None
    for event in metrics_agent.stub().CreateSnapshot(req, timeout=300):
        if event.HasField("started"):
            during = parse(scrape_unix(sock)[1])
        if event.HasField("finished"):
            assert event.finished.state == pb.OPERATION_STATE_SUCCEEDED, event.finished.error.message
            result = event.finished.result
    assert result is not None
    assert value(during, "domsnap_operations_running", kind="create") == 1

    after = parse(scrape_unix(sock)[1])
    assert value(after, "domsnap_operations_running", kind="create") == 0
    assert value(after, "domsnap_operations_total", kind="create", outcome="succeeded") == 1
    assert value(after, "domsnap_operation_duration_seconds_count", kind="create") == 1
    assert value(after, "domsnap_operation_duration_seconds_sum", kind="create") > 0
    # The pause is the manifest's downtime, as the API reports it.
    assert value(after, "domsnap_guest_pause_seconds_count", live="false") == 1
    assert value(after, "domsnap_guest_pause_seconds_sum",
                 live="false") == pytest.approx(result.downtime.ToNanoseconds() / 1e9)
    assert result.downtime.ToNanoseconds() / 1e9 > 0
    # The memory image, and the raw disk's copy (what it holds allocated).
    assert value(after, "domsnap_bytes_written_total", what="memory") == result.memory.size_bytes > 0
    copy = next(d for d in result.disks if d.backend == "raw")
    assert value(after, "domsnap_bytes_written_total", what="disk_copy") == Path(copy.file).stat().st_blocks * 512
    assert value(after, "process_resident_memory_bytes") > 0

    # OpenMetrics for a scraper that asks for it; only GET /metrics is served.
    head, body = scrape_unix(sock, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; "
                                   b"version=1.0.0\r\n\r\n")
    assert "application/openmetrics-text" in head and body.endswith("# EOF\n")
    assert scrape_unix(sock, b"GET /other HTTP/1.1\r\n\r\n")[0].startswith("HTTP/1.1 404")
    assert scrape_unix(sock, b"POST /metrics HTTP/1.1\r\n\r\n")[0].startswith("HTTP/1.1 405")
    assert scrape_unix(sock, b"nonsense\r\n\r\n")[0].startswith("HTTP/1.1 400")


def metrics_agent_version() -> str:
    from domsnap import __version__

    return __version__


@pytest.mark.guest
@pytest.mark.slow
def test_recoveries_are_counted(metrics_agent: Agent, guest: Guest) -> None:
    """The agent SIGKILLed in the middle of a create; the next one rolls it back and counts it."""
    metrics_agent.env[KILL_ENV] = "create:disk:xvda"
    metrics_agent.restart()
    req = pb.CreateSnapshotRequest(domain_name=guest.name, request_id=uuid.uuid4().hex, name="killed")
    with pytest.raises(grpc.RpcError):
        list(metrics_agent.stub().CreateSnapshot(req, timeout=120))
    assert metrics_agent.proc is not None and metrics_agent.proc.wait(timeout=60) == -9
    metrics_agent.proc = None
    del metrics_agent.env[KILL_ENV]
    metrics_agent.start()
    after = parse(scrape_unix(metrics_agent.base / "metrics.sock")[1])
    assert value(after, "domsnap_journal_recoveries_total") == 1


def test_metrics_on_a_loopback_port_the_system_picked(tmp_path_factory: pytest.TempPathFactory) -> None:
    agent = Agent(tmp_path_factory.mktemp("metrics-tcp"), config_toml='[metrics]\nlisten = "127.0.0.1:0"\n')
    agent.start()
    try:
        match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", agent.log.read_text())
        assert match is not None, agent.log.read_text()
        with urllib.request.urlopen(match[1], timeout=10) as resp:
            assert resp.status == 200
            samples = parse(resp.read().decode())
        assert value(samples, "domsnap_operations_running", kind="revert") == 0
        assert ("domsnap_journal_recoveries_total", frozenset()) in samples
    finally:
        agent.stop()


def test_a_non_loopback_metrics_address_stops_the_agent(tmp_path: Path) -> None:
    agent = Agent(tmp_path, config_toml='[metrics]\nlisten = "0.0.0.0:9464"\n')
    with pytest.raises(RuntimeError, match="exited with 2"):
        agent.start()
    assert "the metrics endpoint has no authentication" in agent.log.read_text()
