"""The process runner: argv only, a timeout always, failures as CommandError."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.agent import runner
from domsnap.agent.errors import CommandError, InvalidArgument
from domsnap.agent.runner import run
from tests.unit.test_xen_driver import _gone


def test_output_and_stderr_lines_are_returned_and_followed() -> None:
    seen: list[str] = []
    out = asyncio.run(run(["sh", "-c", "echo out; echo err1 >&2; echo err2 >&2"], timeout=10,
                          on_stderr_line=seen.append))
    assert (out.rc, out.stdout, seen) == (0, "out\n", ["err1", "err2"])


def test_failure_keeps_argv_status_and_last_stderr_line() -> None:
    with pytest.raises(CommandError) as err:
        asyncio.run(run(["sh", "-c", "echo first >&2; echo last words >&2; exit 3"], timeout=10))
    assert err.value.rc == 3 and err.value.argv[0] == "sh"
    assert err.value.message == "sh exited with status 3: last words"


def test_timeout_kills_the_process() -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandError) as err:
        asyncio.run(run(["sleep", "30"], timeout=0.3))
    assert err.value.rc is None and "timed out" in err.value.message
    assert time.monotonic() - t0 < 5


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Path]:
    """Where a command writes the pid of the child it starts; a child left over is killed afterwards."""
    pidfile = tmp_path / "child.pid"
    yield pidfile
    if pidfile.exists() and pidfile.read_text().strip():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def with_a_child(pidfile: Path) -> list[str]:
    # sh waits for a child of its own, which holds sh's output open as long as it runs.
    return ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"]


def ends(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_timeout_kills_what_the_command_started_too(child: Path) -> None:
    """Killing only the command left its child holding the output, and the
    runner waited for that as long as the child ran (30 s here; for ever for
    one that never ends)."""
    t0 = time.monotonic()
    with pytest.raises(CommandError) as err:
        asyncio.run(run(with_a_child(child), timeout=2))
    assert err.value.rc is None and "timed out" in err.value.message
    assert time.monotonic() - t0 < 10
    assert child.read_text().strip(), "the command had not started its child by its timeout"
    assert ends(int(child.read_text())), "the command's child outlived it"


def test_a_cancelled_command_ends_at_once_with_what_it_started(child: Path) -> None:
    async def main() -> float:
        task = asyncio.create_task(run(with_a_child(child), timeout=60))
        while not (child.exists() and child.read_text().strip()):
            assert not task.done(), task
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert asyncio.run(main()) < 10
    assert ends(int(child.read_text())), "the command's child outlived it"


def test_missing_program_is_a_command_error() -> None:
    with pytest.raises(CommandError) as err:
        asyncio.run(run(["/nonexistent/qemu-system-x86_64", "--version"], timeout=5))
    assert err.value.rc == 127 and "No such file or directory" in err.value.message


@pytest.mark.parametrize("argv", [[], ["echo", "a\0b"]])
def test_malformed_argv_is_refused(argv: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        asyncio.run(run(argv, timeout=5))


def test_a_tally_counts_the_commands_of_its_context_and_of_the_tasks_it_starts() -> None:
    async def main() -> tuple[runner.CommandTally, runner.CommandTally]:
        outside = asyncio.create_task(run(["true"], timeout=10))
        await outside
        async def op() -> None:
            await run(["sleep", "0.2"], timeout=10)

        tally = runner.start_tally()
        await run(["/bin/sh", "-c", "exit 0"], timeout=10)
        await asyncio.create_task(op())  # the operation's task inherits the tally
        other = await asyncio.create_task(in_another_tally())
        return tally, other

    async def in_another_tally() -> runner.CommandTally:
        tally = runner.start_tally()
        await run(["true", "x"], timeout=10)
        return tally

    tally, other = asyncio.run(main())
    assert [what for what, _ in tally.commands] == ["sh -c", "sleep 0.2"]
    assert tally.commands[1][1] >= 0.2 and tally.seconds >= 0.2
    assert [what for what, _ in other.commands] == ["true x"]
    summary = tally.summary()
    assert summary.startswith("wall=") and " n=2 sh_-c=" in summary and "sleep_0.2=" in summary
    wall = float(summary.split()[0].removeprefix("wall="))
    assert wall >= tally.seconds


def test_a_failing_command_is_counted_too() -> None:
    async def main() -> runner.CommandTally:
        tally = runner.start_tally()
        with pytest.raises(CommandError):
            await run(["sh", "-c", "exit 4"], timeout=10)
        return tally

    assert [what for what, _ in asyncio.run(main()).commands] == ["sh -c"]


def test_a_tally_says_where_the_time_between_its_commands_went(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    tally = runner.CommandTally(started=100.0)
    # 0.5 s of the agent's own, a 2 s save, 0.25 s, a 1 s unpause, then 0.75 s to the end.
    now[0] = 102.5
    tally.add("xl save", 2.0)
    now[0] = 103.75
    tally.add("xl unpause", 1.0)
    now[0] = 104.5
    assert tally.own() == "total=1.500 before_xl_save=0.500 before_xl_unpause=0.250 end=0.750"
    assert runner.CommandTally().own().startswith("total=")


def test_a_tallys_own_time_is_split_at_marks_and_not_counted_inside_a_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    tally = runner.CommandTally(started=100.0)
    runner._tally.set(tally)
    now[0] = 100.25
    runner.tally_mark("looked up")
    # A live save: xl migrate from 100.5 to 110, a QMP command in its pause (109 to 109.5), told first.
    now[0] = 109.5
    tally.add("qmp snapshot", 0.5)
    now[0] = 110.0
    tally.add("xl migrate", 9.5)
    now[0] = 110.5
    assert tally.own() == ("total=1.000 before_looked_up=0.250 before_xl_migrate=0.250 "
                           "before_qmp_snapshot=0.000 end=0.500")
    runner._tally.set(None)
