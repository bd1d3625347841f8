"""bench/rpc_trace.py: a call's segments from the client's stamps and the agent's trace."""

import json
from pathlib import Path

import pytest

from bench.rpc_trace import ClientCall, match, rows

ME, OTHER = "unix-abstract:00001", "unix-abstract:00002"


def _trace(tmp_path: Path, relay: list[tuple[float, str, str]], calls: list[tuple[float, float, str, str]]) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"relay": relay, "calls": calls}))
    return path


def test_segments_from_the_clients_connection_only(tmp_path: Path) -> None:
    trace = _trace(tmp_path, relay=[
        (10.0010, ME, "in"), (10.0015, ME, "in"),  # the request in two reads: the last one counts
        (10.0020, OTHER, "in"), (10.0030, OTHER, "out"),  # another client's call meanwhile
        (10.0050, ME, "out"), (10.0055, ME, "out"),  # the answer: its first read after the handler
        (11.0001, ME, "in"), (11.0003, ME, "out"),
    ], calls=[(10.0025, 10.0040, "/domsnap.v1.SnapshotAgent/GetAgentInfo", ME),
              (10.0021, 10.0028, "/domsnap.v1.SnapshotAgent/CreateSnapshot", OTHER),
              (11.0002, 11.0002, "/domsnap.v1.SnapshotAgent/GetAgentInfo", ME)])
    first, _ = match(trace, [ClientCall("GetAgentInfo", 10.0, 10.0060), ClientCall("GetAgentInfo", 11.0, 11.0004)])
    assert first.total == pytest.approx(0.0060)
    assert first.parts == pytest.approx((0.0015, 0.0010, 0.0015, 0.0010, 0.0010))


def test_a_call_without_its_whole_trace_is_left_out(tmp_path: Path) -> None:
    # The answer's read falls after the client had it: not this call's.
    trace = _trace(tmp_path, relay=[(1.001, ME, "in"), (1.009, ME, "out")],
                   calls=[(1.002, 1.003, "/grpc.health.v1.Health/Check", ME)])
    assert match(trace, [ClientCall("Check", 1.0, 1.005)]) == []


def test_rows_name_the_slow_calls_largest_part(tmp_path: Path) -> None:
    relay, served, calls = [], [], []
    for i in range(200):
        t0 = float(i)
        wait = 0.004 if i >= 198 else 0.0001  # the slowest 1 % wait before their handler
        relay += [(t0 + 0.0001, ME, "in"), (t0 + 0.0003 + wait, ME, "out")]
        served.append((t0 + 0.0001 + wait, t0 + 0.0002 + wait, "/grpc.health.v1.Health/Check", ME))
        calls.append(ClientCall("Check", t0, t0 + 0.0004 + wait))
    table = rows(match(_trace(tmp_path, relay, served), calls), len(calls))
    by_segment = {r[0].rsplit(": ", 1)[1]: r[1] for r in table}
    assert by_segment["relay → handler"].startswith("4.00 ms (the largest part in 2 of 2)")
    assert rows([], 5)[0][0].endswith("0 of 5 calls traced, too few to tell")
