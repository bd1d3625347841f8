"""agent/metrics.py as the operations' observer, without a hypervisor: real
Operations running small bodies, outcomes by label, an observer that fails
never failing an operation, and `[metrics] listen` refusing what is not
loopback or a unix socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from domsnap.agent import config as agent_config
from domsnap.agent.errors import InvalidArgument, NotFound
from domsnap.agent.metrics import Metrics
from domsnap.agent.operations import Operation, Operations, OpKind, OpState


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


async def _run_ops(operations: Operations) -> list[Operation]:
    release = asyncio.Event()

    async def ok(op: Operation) -> None:
        await release.wait()

    async def fails(op: Operation) -> None:
        raise NotFound("gone")

    async def slow(op: Operation) -> None:
        await asyncio.sleep(60)

    ops = [operations.start(OpKind.CREATE, "a", "s1", "", ok),
           operations.start(OpKind.REVERT, "b", "s2", "", fails),
           operations.start(OpKind.DELETE, "c", "s3", "", slow)]
    await asyncio.sleep(0.05)
    operations.cancel(ops[2].id)
    release.set()
    await operations.drain(5)
    return ops


def test_outcomes_durations_and_the_running_gauge() -> None:
    metrics = Metrics("qemu")
    ops = asyncio.run(_run_ops(Operations(metrics)))
    assert [op.state for op in ops] == [OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELLED]
    s = samples(metrics)
    for kind, outcome in (("create", "succeeded"), ("revert", "failed"), ("delete", "cancelled")):
        assert s[("domsnap_operations_total", frozenset({("kind", kind), ("outcome", outcome)}))] == 1
        assert s[("domsnap_operation_duration_seconds_count", frozenset({("kind", kind)}))] == 1
        assert s[("domsnap_operations_running", frozenset({("kind", kind)}))] == 0
    # A create whose result is no snapshot (here: None) adds no pause and no bytes.
    assert ("domsnap_guest_pause_seconds_count", frozenset({("live", "false")})) not in s
    assert s[("domsnap_bytes_written_total", frozenset({("what", "memory")}))] == 0


def test_a_failing_observer_never_fails_the_operation() -> None:
    class Broken:
        def started(self, op: Operation) -> None:
            raise RuntimeError("observer bug")

        def finished(self, op: Operation) -> None:
            raise RuntimeError("observer bug")

    async def run() -> Operation:
        operations = Operations(Broken())

        async def body(op: Operation) -> str:
            return "done"

        op = operations.start(OpKind.CREATE, "a", "s", "", body)
        await operations.drain(5)
        assert operations.busy_with("a") is None
        return op

    op = asyncio.run(run())
    assert op.state is OpState.SUCCEEDED and op.result == "done"


def test_recoveries() -> None:
    metrics = Metrics()
    metrics.recovered(2)
    assert samples(metrics)[("domsnap_journal_recoveries_total", frozenset())] == 2


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "localhost:0", "[::1]:9464", "unix:/run/domsnap/metrics.sock"])
def test_metrics_listen_accepts_loopback_and_unix(tmp_path: Path, listen: str) -> None:
    (tmp_path / "c.toml").write_text(f'[metrics]\nlisten = "{listen}"\n')
    assert agent_config.load(tmp_path / "c.toml").metrics.listen == listen


@pytest.mark.parametrize(("listen", "why"), [
    ("0.0.0.0:9464", "no authentication"),
    ("192.0.2.1:9464", "no authentication"),
    ("[::]:9464", "no authentication"),
    ("unix:metrics.sock", "must be absolute"),
    ("metrics.example:9464", "not an IP address"),
])
def test_metrics_listen_refuses_the_rest(tmp_path: Path, listen: str, why: str) -> None:
    (tmp_path / "c.toml").write_text(f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(InvalidArgument, match=why):
        agent_config.load(tmp_path / "c.toml")


def test_metrics_are_off_by_default() -> None:
    assert agent_config.AgentConfig().metrics.listen == ""
