"""Renders an operation's event stream (create, revert, delete, watch).

Three forms: a bar redrawn in place on a terminal that can (not TERM=dumb),
plain timestamped lines for logs and pipes (one per phase, or per
LINE_INTERVAL seconds), one JSON object per event for programs. Progress
goes to stderr and JSON to stdout, so `domsnap ... > result` keeps only the
result. Every form starts with the operation's id, needed to watch or
cancel it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from domsnap.v1 import domsnap_pb2 as pb

from .views import (
    domain_state_word,
    human_bytes,
    human_duration,
    json_text,
    operation_kind_word,
    phase_word,
    seconds,
    to_dict,
)

MIB = 1024 * 1024
# Redrawing faster than this only costs CPU and flickers.
MIN_REDRAW_INTERVAL = 0.1
# A log gets a line per phase, and within a long phase one per this many seconds.
LINE_INTERVAL = 5.0
_BAR_WIDTH = 20
# An estimate from less than this is noise.
_ETA_AFTER = 1.0


class Renderer(Protocol):
    def event(self, event: pb.OperationEvent) -> None: ...

    def close(self) -> None:
        """The stream ended (finished, failed or detached): leave the terminal clean."""


def make_renderer(*, json: bool, out: TextIO, err: TextIO) -> Renderer:
    if json:
        return JsonRenderer(out)
    if can_redraw(err):
        return BarRenderer(err)
    return LineRenderer(err)


def can_redraw(stream: TextIO) -> bool:
    """A terminal that understands `\\r` and erase-line (not TERM=dumb, or no TERM)."""
    return stream.isatty() and os.environ.get("TERM", "dumb") not in ("dumb", "unknown", "")


def started_line(op: pb.Operation) -> str:
    what = f"{operation_kind_word(op.kind)} {op.domain}"
    return f"operation {op.id}: {what} {op.snapshot}" if op.snapshot else f"operation {op.id}: {what}"


class JsonRenderer:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def event(self, event: pb.OperationEvent) -> None:
        self._out.write(json_text(to_dict(event), pretty=False) + "\n")
        # A program reading the pipe wants each event as it happens.
        self._out.flush()

    def close(self) -> None:
        pass


class LineRenderer:
    """Plain lines, each with its time: the start, each new phase, and within a
    phase a line per LINE_INTERVAL seconds at most."""

    def __init__(self, err: TextIO, *, clock: Callable[[], float] = time.time) -> None:
        self._err = err
        self._clock = clock
        self._phase: pb.Phase.ValueType = pb.PHASE_UNSPECIFIED
        self._last = 0.0

    def event(self, event: pb.OperationEvent) -> None:
        kind = event.WhichOneof("event")
        now = self._clock()
        if kind == "started":
            # Logs then hold the id needed to watch or cancel the operation.
            self._emit(now, started_line(event.started))
        elif kind == "progress":
            p = event.progress
            if p.phase != self._phase or now - self._last >= LINE_INTERVAL:
                self._phase = p.phase
                self._emit(now, f"{phase_word(p.phase)} {p.percent:.0f}% {p.message}".rstrip())

    def _emit(self, now: float, line: str) -> None:
        self._last = now
        self._err.write(f"{time.strftime('%H:%M:%S', time.localtime(now))} {line}\n")
        self._err.flush()

    def close(self) -> None:
        pass


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class BarRenderer:
    """One status line, redrawn in place with `\\r`."""

    def __init__(
        self,
        err: TextIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
    ) -> None:
        self._err = err
        self._clock = clock
        self._width = width or (lambda: _terminal_width(err))
        self._pending: pb.Progress | None = None
        self._last_draw: float | None = None
        self._drawn = False
        self._began: float | None = None

    def event(self, event: pb.OperationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            # Above the bar, and kept: the id to watch or cancel with.
            self._err.write(started_line(event.started) + "\n")
            self._err.flush()
        if kind != "progress":
            return
        self._pending = event.progress
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= MIN_REDRAW_INTERVAL:
            self._draw(now)

    def _draw(self, now: float) -> None:
        if self._pending is None:
            return
        # One column short of the width: writing the last column makes some
        # terminals wrap, and `\r` would then redraw only the second row.
        if self._began is None:
            self._began = now
        line = bar_line(self._pending, eta(self._pending, now - self._began))[: max(self._width() - 1, 0)]
        self._err.write("\r" + line + "\x1b[K")
        self._err.flush()
        self._pending = None
        self._last_draw = now
        self._drawn = True

    def close(self) -> None:
        # The latest state may have been throttled away; show where it ended.
        self._draw(self._clock())
        if self._drawn:
            self._err.write("\n")
            self._err.flush()
            self._drawn = False


def eta(p: pb.Progress, elapsed: float) -> float | None:
    """Seconds left: from the bytes still to move at the current rate, else
    from the percent done so far; None while too early to tell."""
    if p.bytes_per_second > 0 and p.bytes_total > p.bytes_done:
        return (p.bytes_total - p.bytes_done) / p.bytes_per_second
    if elapsed >= _ETA_AFTER and 0 < p.percent < 100:
        return elapsed * (100 - p.percent) / p.percent
    return None


def bar_line(p: pb.Progress, left: float | None = None) -> str:
    percent = min(max(p.percent, 0.0), 100.0)
    filled = round(_BAR_WIDTH * percent / 100)
    parts = [f"{phase_word(p.phase):<9}", f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}]", f"{percent:3.0f}%"]
    if p.bytes_total:
        parts.append(f"{human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}")
    if p.bytes_per_second:
        parts.append(f"{p.bytes_per_second / MIB:.1f} MiB/s")
    if left is not None:
        parts.append(f"ETA {human_duration(left)}")
    if p.message:
        parts.append(p.message)
    return "  ".join(parts)


def _elapsed_seconds(op: pb.Operation) -> float | None:
    if not op.HasField("started_at") or not op.HasField("finished_at"):
        return None
    return (op.finished_at.ToNanoseconds() - op.started_at.ToNanoseconds()) / 1e9


def result_line(op: pb.Operation, domain: pb.Domain | None = None, command: str = "domsnap") -> str:
    """What a successful operation did, for stdout; after a revert, `domain`
    as it is now (its state and new domid)."""
    elapsed = _elapsed_seconds(op)
    timing = [human_duration(elapsed)] if elapsed is not None else []
    snap = op.result
    if op.kind == pb.OPERATION_KIND_CREATE_SNAPSHOT:
        timing.append(f"guest paused {human_duration(seconds(snap.downtime))}")
        text = f"Snapshot {snap.name} of {snap.domain} created at {snap.path}"
    elif op.kind == pb.OPERATION_KIND_REVERT_SNAPSHOT:
        text = f"Domain {op.domain} reverted to snapshot {snap.name or op.snapshot}"
        if snap.path:
            text += f" at {snap.path}"
    elif op.kind == pb.OPERATION_KIND_DELETE_SNAPSHOT:
        text = f"Snapshot {op.snapshot} of {op.domain} deleted"
        if others := [name for name in op.deleted if name != op.snapshot]:
            text += f", and its descendants {', '.join(others)}"
    else:
        text = f"Operation {op.id} finished"
    line = f"{text} ({', '.join(timing)})" if timing else text
    if domain is not None:
        line += f"; it is {domain_state_word(domain.state)}, domid {domain.domid}"
        if domain.state == pb.DOMAIN_STATE_PAUSED:
            line += f" (run it: {command} unpause {domain.name})"
    return line


class MemberLines:
    """A group operation's progress, member by member: a line per member at
    each new phase (and within a phase one per LINE_INTERVAL seconds at
    most), prefixed with DOMAIN@ADDR; with `json`, one object per event on
    `out`: {"member": ..., "progress": {...}}."""

    def __init__(self, *, json: bool, out: TextIO, err: TextIO, clock: Callable[[], float] = time.time) -> None:
        self._json = json
        self._stream = out if json else err
        self._clock = clock
        self._seen: dict[str, tuple[str, float]] = {}

    def __call__(self, member: object, word: str, p: pb.Progress) -> None:
        who = str(member)
        if self._json:
            self._stream.write(json_text({"member": who, "phase": word, "progress": to_dict(p)}, pretty=False)
                               + "\n")
            self._stream.flush()
            return
        now = self._clock()
        phase, last = self._seen.get(who, ("", 0.0))
        if word == phase and now - last < LINE_INTERVAL:
            return
        self._seen[who] = (word, now)
        line = f"{who}: {word}" + (f" {p.percent:.0f}%" if p.percent else "") + (f" {p.message}" if p.message
                                                                                 else "")
        self._stream.write(f"{time.strftime('%H:%M:%S', time.localtime(now))} {line}\n")
        self._stream.flush()
