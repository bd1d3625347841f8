"""Renders an operation's event stream (create, revert, delete, watch).

Three forms: a bar redrawn in place on a terminal, plain lines for logs and
pipes, one JSON object per event for programs. Progress goes to stderr and
JSON to stdout, so `domsnap ... > result` keeps only the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from domsnap.v1 import domsnap_pb2 as pb

from .views import human_bytes, json_text, operation_kind_word, to_dict

MIB = 1024 * 1024
# Redrawing faster than this only costs CPU and flickers.
MIN_REDRAW_INTERVAL = 0.1
_BAR_WIDTH = 20


class Renderer(Protocol):
    def event(self, event: pb.OperationEvent) -> None: ...

    def close(self) -> None:
        """The stream ended (finished, failed or detached): leave the terminal clean."""


def make_renderer(*, json: bool, out: TextIO, err: TextIO) -> Renderer:
    if json:
        return JsonRenderer(out)
    if err.isatty():
        return BarRenderer(err)
    return LineRenderer(err)


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
    def __init__(self, err: TextIO) -> None:
        self._err = err
        self._last = ""

    def event(self, event: pb.OperationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            # Logs then hold the id needed to watch or cancel the operation.
            self._emit(f"operation {event.started.id}: {_describe(event.started)}")
        elif kind == "progress":
            p = event.progress
            self._emit(f"{p.phase} {p.percent:.0f}% {p.message}".rstrip())

    def _emit(self, line: str) -> None:
        # Agents report often and the percent is rounded: many events print alike.
        if line == self._last:
            return
        self._last = line
        self._err.write(line + "\n")
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

    def event(self, event: pb.OperationEvent) -> None:
        if event.WhichOneof("event") != "progress":
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
        line = bar_line(self._pending)[: max(self._width() - 1, 0)]
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


def bar_line(p: pb.Progress) -> str:
    percent = min(max(p.percent, 0.0), 100.0)
    filled = round(_BAR_WIDTH * percent / 100)
    parts = [f"{p.phase:<9}", f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}]", f"{percent:3.0f}%"]
    if p.bytes_total:
        parts.append(f"{human_bytes(p.bytes_done)} / {human_bytes(p.bytes_total)}")
    if p.bytes_per_second:
        parts.append(f"{p.bytes_per_second / MIB:.1f} MiB/s")
    if p.message:
        parts.append(p.message)
    return "  ".join(parts)


def _describe(op: pb.Operation) -> str:
    what = f"{operation_kind_word(op.kind)} {op.domain}"
    return f"{what} {op.snapshot}" if op.snapshot else what


def _elapsed_seconds(op: pb.Operation) -> float | None:
    if not op.HasField("started_at") or not op.HasField("finished_at"):
        return None
    return (op.finished_at.ToNanoseconds() - op.started_at.ToNanoseconds()) / 1e9


def result_line(op: pb.Operation) -> str:
    """What a successful operation did, for stdout."""
    elapsed = _elapsed_seconds(op)
    timing = [f"{elapsed:.1f}s"] if elapsed is not None else []
    snap = op.result
    if op.kind == pb.OPERATION_KIND_CREATE_SNAPSHOT:
        timing.append(f"guest paused {snap.downtime_seconds * 1000:.0f} ms")
        text = f"Snapshot {snap.name} of {snap.domain} created at {snap.path}"
    elif op.kind == pb.OPERATION_KIND_REVERT_SNAPSHOT:
        text = f"Domain {op.domain} reverted to snapshot {snap.name or op.snapshot}"
        if snap.path:
            text += f" at {snap.path}"
    elif op.kind == pb.OPERATION_KIND_DELETE_SNAPSHOT:
        text = f"Snapshot {op.snapshot} of {op.domain} deleted"
    else:
        text = f"Operation {op.id} finished"
    return f"{text} ({', '.join(timing)})" if timing else text
