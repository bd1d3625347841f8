"""Where a unary call's time goes, from the client to the agent and back: the
client's own stamps matched with the agent's trace (bench/tracehook with
DOMSNAP_BENCH_TRACE_RPC), all on the system-wide monotonic clock.

A call through the unix socket crosses five segments:

  client → relay          the client's send until the relay is woken to read it
  relay → handler         the relay's write to gRPC's socket until the handler
                          starts (gRPC's transport and its threads' hand-offs
                          to the event loop)
  handler                 the servicer, inside the agent's interceptor
  handler → relay         the answer serialized and sent, until the relay is
                          woken to read it
  relay → client          the relay's write until the client has the answer

Each is a thread's wake-up at least: on a loaded host, where a tail comes from.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SEGMENTS = ("client → relay", "relay → handler", "handler", "handler → relay", "relay → client")


@dataclass(frozen=True)
class ClientCall:
    """One call as the client timed it (time.monotonic before and after)."""

    label: str
    t0: float
    t1: float


@dataclass(frozen=True)
class Traced:
    total: float
    parts: tuple[float, float, float, float, float]


def match(trace: Path, calls: list[ClientCall]) -> list[Traced]:
    """The calls whose trace is complete, each split into SEGMENTS (seconds)."""
    doc = json.loads(trace.read_text())
    served = sorted((float(s0), float(s1), str(peer)) for s0, s1, _method, peer in doc["calls"])
    # The client's connection: the peer most of its calls were served from.
    starts = [s[0] for s in served]
    seen: Counter[str] = Counter()
    for c in calls:
        i = bisect.bisect_left(starts, c.t0)
        seen.update(s[2] for s in served[i:i + 3] if s[0] <= c.t1)
    if not seen:
        return []
    peer = seen.most_common(1)[0][0]
    served = [s for s in served if s[2] == peer]
    starts = [s[0] for s in served]
    ins = sorted(float(t) for t, p, d in doc["relay"] if p == peer and d == "in")
    outs = sorted(float(t) for t, p, d in doc["relay"] if p == peer and d == "out")
    out: list[Traced] = []
    for c in calls:
        i = bisect.bisect_left(starts, c.t0)
        if i == len(served) or served[i][0] > c.t1:
            continue
        s0, s1, _ = served[i]
        # The request's last read before the handler started; the answer's first after it ended.
        j, k = bisect.bisect_right(ins, s0) - 1, bisect.bisect_left(outs, s1)
        if j < 0 or ins[j] < c.t0 or k == len(outs) or outs[k] > c.t1:
            continue
        r_in, r_out = ins[j], outs[k]
        out.append(Traced(c.t1 - c.t0, (r_in - c.t0, s0 - r_in, s1 - s0, r_out - s1, c.t1 - r_out)))
    return out


def rows(traced: list[Traced], of: int) -> list[tuple[str, str, str, str, str]]:
    """The slowest 1 %'s median per segment beside the fastest half's, and how
    often each segment was the largest part of a slow call."""
    if len(traced) < 100:
        return [(f"the unary calls' segments: {len(traced)} of {of} calls traced, too few to tell", "", "", "", "")]
    ranked = sorted(traced, key=lambda t: t.total)
    slow, fast = ranked[int(len(ranked) * 0.99):], ranked[:len(ranked) // 2]
    largest = Counter(SEGMENTS[max(range(len(SEGMENTS)), key=lambda k: t.parts[k])] for t in slow)
    out = []
    for k, name in enumerate(SEGMENTS):
        out.append((f"the slowest 1 % of unary calls through the relay ({len(slow)} of {len(traced)} traced, "
                    f"median {statistics.median(t.total for t in slow) * 1000:.2f} ms): {name}",
                    f"{statistics.median(t.parts[k] for t in slow) * 1000:.2f} ms (the largest part in "
                    f"{largest[name]} of {len(slow)})",
                    f"the fastest half: {statistics.median(t.parts[k] for t in fast) * 1000:.2f} ms", "", ""))
    return out
