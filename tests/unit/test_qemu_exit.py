"""The qemu driver waits for a QEMU that was told to quit through its pidfd:
woken when the process ends, not at the next poll; killed after its grace,
through the same pidfd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from domsnap.agent.drivers.qemu import _reap


def test_woken_when_the_process_ends_and_killed_after_its_grace() -> None:
    async def main() -> None:
        quick = subprocess.Popen(["sleep", "0.3"])
        slow = subprocess.Popen(["sleep", "30"])
        try:
            t0 = time.monotonic()
            await _reap(quick.pid, 10)
            assert 0.25 < time.monotonic() - t0 < 2
            assert quick.wait(5) == 0, "ended by itself, within its grace"
            t0 = time.monotonic()
            await _reap(slow.pid, 0.2)
            assert 0.15 < time.monotonic() - t0 < 5
            assert slow.wait(5) == -signal.SIGKILL
        finally:
            slow.kill()

    asyncio.run(main())


def test_the_kill_and_the_wait_are_for_the_process_not_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU gone, its pid may name another process at once: by pid, its kill
    would hit that one and the wait for it last as long as that one runs."""
    qemu = subprocess.Popen(["sleep", "30"])  # a QEMU that ignores quit
    other = subprocess.Popen(["sleep", "30"])  # what its pid names once it is gone
    real_pidfd_open = os.pidfd_open
    opened: list[int] = []

    def pidfd_open(pid: int, flags: int = 0) -> int:
        opened.append(pid)
        return real_pidfd_open(pid if len(opened) == 1 else other.pid, flags)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    try:
        asyncio.run(asyncio.wait_for(_reap(qemu.pid, 0.2), 10))
        assert qemu.wait(5) == -signal.SIGKILL
        assert other.poll() is None, "another process was killed"
    finally:
        qemu.kill()
        other.kill()
        qemu.wait()
        other.wait()
