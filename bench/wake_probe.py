"""The host's own wake-up latency: a process that sleeps 0.5 ms at a time
and records how late each wake-up came. Run beside a latency measurement,
it tells what any process on the host waits for a core, whatever it does.

On these machines (a 2-core VM whose idle vCPUs halt) a timer's wake-up is
sometimes 2-8 ms late even with the host idle; a unary RPC crosses several
wake-ups (client, relay, gRPC's poller, the event loop), so its p99 is not
below this floor.

    .venv/bin/python -m bench.wake_probe   # until SIGTERM; prints JSON: every lateness in seconds
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

NAP = 0.0005


def sample() -> list[float]:
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    late = []
    while not stopped:
        t0 = time.perf_counter()
        time.sleep(NAP)
        late.append(time.perf_counter() - t0 - NAP)
    return late


class WakeProbe:
    """The probe as a process of its own: in the measuring client, a thread's GIL would count."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.wake_probe"], stdout=subprocess.PIPE, text=True)

    def stop(self) -> list[float]:
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=60)
        return [float(v) for v in json.loads(out)]


if __name__ == "__main__":
    print(json.dumps(sample()))
