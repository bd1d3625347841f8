"""The one way the agent starts a process: an argv list, a timeout, always.

No shell is ever involved. A failure raises `CommandError` carrying what ran
and what it said. Each command leads a process group of its own: at its
timeout, or when the caller is cancelled, the whole group is killed, so no
child it started lives on holding its output open (the wait for the command
would last as long as that child). The runner is injected into drivers and
backends so the contract tests can check the exact argv and replay recorded
output.

Each command's wall time is logged (debug) and added to the CommandTally of
the current context, if one was started: an operation's cost, set against
the tools it waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from .errors import CommandError, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


class Runner(Protocol):
    async def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        check: bool = True,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> CommandResult: ...


# Words of an argv that name what ran in a tally: the tool and its verb ("xl restore").
TALLY_WORDS: Final = 2


@dataclass
class CommandTally:
    """The commands run in one context (an RPC and the operation it starts:
    a task inherits its creator's context, so both add to the same tally)."""

    started: float = field(default_factory=time.monotonic)
    # Each command waited on: what, when it ended (time.monotonic()), how long it took.
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    # Points of the agent's own work (`tally_mark`), to split its time between commands.
    marks: list[tuple[str, float]] = field(default_factory=list)

    @property
    def commands(self) -> list[tuple[str, float]]:
        """Each command and its seconds."""
        return [(what, seconds) for what, _, seconds in self.spans]

    @property
    def seconds(self) -> float:
        return sum(seconds for _, _, seconds in self.spans)

    def add(self, what: str, seconds: float) -> None:
        self.spans.append((what, time.monotonic(), seconds))

    def own(self) -> str:
        """`total=S` and where the time waited on no command went: before
        each command and mark (`before_tool_verb=S`, from the end of the one
        before) and after the last (`end=S`), for the log."""
        now = time.monotonic()
        events = sorted([(end - seconds, end, what) for what, end, seconds in self.spans]
                        + [(at, at, what) for what, at in self.marks])
        parts: list[str] = []
        total, mark = 0.0, self.started
        for start, end, what in events:
            gap = max(0.0, start - mark)
            total += gap
            parts.append(f"before_{what.replace(' ', '_')}={gap:.3f}")
            mark = max(mark, end)
        total += now - mark
        return " ".join([f"total={total:.3f}", *parts, f"end={now - mark:.3f}"])

    def summary(self) -> str:
        """`wall=S commands=S n=N` and each command as `tool_verb=S`, for the log."""
        wall = time.monotonic() - self.started
        each = " ".join(f"{what.replace(' ', '_')}={seconds:.3f}" for what, seconds in self.commands)
        return f"wall={wall:.3f} commands={self.seconds:.3f} n={len(self.commands)} {each}".rstrip()


_tally: contextvars.ContextVar[CommandTally | None] = contextvars.ContextVar("command_tally", default=None)


def start_tally() -> CommandTally:
    """A new tally for the commands run from now on in this context (and in tasks it creates)."""
    tally = CommandTally()
    _tally.set(tally)
    return tally


def current_tally() -> CommandTally | None:
    """The tally of this context: its request and operation, if one was started."""
    return _tally.get()


def tally_add(what: str, seconds: float) -> None:
    """Count `seconds` spent waiting on a tool (`what`: "tool verb") in the current tally, if any:
    the runner's commands, and requests to a running tool (a device model's QMP)."""
    if (tally := _tally.get()) is not None:
        tally.add(what, seconds)


def tally_mark(what: str) -> None:
    """Mark a point of the agent's own work in the current tally, if any (where its time went)."""
    if (tally := _tally.get()) is not None:
        tally.marks.append((what, time.monotonic()))


def _record(argv: Sequence[str], seconds: float) -> None:
    log.debug("ran %s in %.3f s", argv, seconds)
    tally_add(" ".join(a.rsplit("/", 1)[-1] for a in argv[:TALLY_WORDS]), seconds)


def _check_argv(argv: Sequence[str]) -> None:
    if not argv or any(not isinstance(a, str) or "\0" in a for a in argv):
        raise InvalidArgument(f"refusing to run a malformed command: {argv!r}")


async def _read_lines(stream: asyncio.StreamReader, sink: list[str], on_line: Callable[[str], None] | None) -> None:
    # Line by line so tools that report progress on stderr (xl save, qemu-img
    # convert -p) can be followed while they run.
    while line := await stream.readline():
        text = line.decode(errors="replace")
        sink.append(text)
        if on_line is not None:
            on_line(text.rstrip("\r\n"))


def watch_children_by_pidfd() -> None:
    """Have the running loop learn of its children's exits through pidfds.
    Python 3.11's default watcher starts a thread per process and waits on
    the event loop until that thread runs: under load, milliseconds of
    every other call stalled for each qemu-img. 3.12 uses pidfds itself."""
    if sys.version_info < (3, 12):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    on_stderr_line: Callable[[str], None] | None = None,
) -> CommandResult:
    """Run `argv` to completion; kill it and raise CommandError after `timeout`."""
    _check_argv(argv)
    log.debug("run %s", argv)
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            process_group=0,
        )
    except OSError as exc:  # not installed, not executable
        raise CommandError(argv, 127, "", f"{argv[0]}: {exc.strerror}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    readers = asyncio.gather(_read_lines(proc.stdout, out, None), _read_lines(proc.stderr, err, on_stderr_line))
    try:
        await asyncio.wait_for(asyncio.shield(readers), timeout)
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        # The group, not only the command: asyncio's wait() lasts until the
        # output is closed by every process holding it. (A child that left
        # the group is a daemon, and a daemon closes what it inherited.)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        await readers
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CommandError(argv, None, "".join(out), "".join(err)) from exc
    finally:
        _record(argv, time.monotonic() - t0)
    result = CommandResult(tuple(argv), rc, "".join(out), "".join(err))
    if check and rc != 0:
        raise CommandError(argv, rc, result.stdout, result.stderr)
    return result
