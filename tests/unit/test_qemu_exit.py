"""The qemu driver waits for a QEMU that was told to quit through its pidfd:
woken when the process ends, not at the next poll."""

from __future__ import annotations

import asyncio
import subprocess
import time

from domsnap.agent.drivers.qemu import _exited


def test_woken_when_the_process_ends_and_not_before() -> None:
    async def main() -> None:
        quick = subprocess.Popen(["sleep", "0.3"])
        slow = subprocess.Popen(["sleep", "30"])
        try:
            t0 = time.monotonic()
            assert await _exited(quick.pid, 10)
            assert 0.25 < time.monotonic() - t0 < 2
            assert not await _exited(slow.pid, 0.2)
            slow.kill()
            assert await _exited(slow.pid, 10)
            quick.wait()
            slow.wait()
            assert await _exited(quick.pid, 0), "a process already gone (reaped) is not waited for"
        finally:
            slow.kill()

    asyncio.run(main())
