"""A migration receiver that records a live save image and never takes the domain.

Run by `xl migrate -s "" DOM "<rune>"` (xl runs the rune with `sh -c`, its
stdin/stdout being xl's pipes):

    python -m domsnap.agent.drivers.xen_sink OUT CONTROL

It writes xl's receiver banner, then copies every byte xl sends to OUT (the
same bytes `xl save` writes: a restorable save image), following the stream
with `StreamParser`. At libxl's END record the domain is suspended and xl
waits for the receiver's "ready": the sink tells the agent over the unix
socket CONTROL (`complete <bytes>`), waits for `release` (or for the agent to
go away), and exits WITHOUT answering "ready". xl then reports "Migration
failed, resuming at sender" and resumes the domain where it was.

Messages to the agent, one per line: `progress <bytes>`, `complete <bytes>`,
`failed <reason>`. From the agent: `release` (any line, or EOF, also aborts a
stream still under way: the sink exits and xl gives up, resuming the domain).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
from collections.abc import Sequence
from typing import Final

from .xen_stream import StreamError, StreamParser

# tools/xl/xl.h migrate_receiver_banner, sent without its NUL.
BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
CHUNK: Final = 4 << 20
PROGRESS_EVERY: Final = 64 << 20

PROGRESS: Final = "progress"
COMPLETE: Final = "complete"
FAILED: Final = "failed"
RELEASE: Final = "release"


def _say(control: socket.socket, *words: object) -> None:
    # If the agent went away, xl resumes the domain once we exit anyway.
    with contextlib.suppress(OSError):
        control.sendall((" ".join(str(w) for w in words) + "\n").encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fail(control: socket.socket, reason: str) -> int:
    print(f"domsnap xen_sink: {reason}", file=sys.stderr)
    _say(control, FAILED, reason)
    return 1


def record(stream_in: int, out: int, control: socket.socket) -> int:
    """Copy the stream to `out` until libxl's END; 0 once the agent released us."""
    parser = StreamParser()
    sel = selectors.DefaultSelector()
    sel.register(stream_in, selectors.EVENT_READ, "stream")
    sel.register(control, selectors.EVENT_READ, "control")
    next_progress = PROGRESS_EVERY
    while not parser.done:
        for key, _mask in sel.select():
            if key.data == "control":
                # The agent gave up (cancelled, timed out, or died) before the end.
                return _fail(control, f"released by the agent at stream offset {parser.offset}")
            chunk = os.read(stream_in, CHUNK)
            if not chunk:
                return _fail(control, f"xl closed the stream after {parser.offset} bytes, "
                                      f"while expecting {parser.where}")
            _write_all(out, chunk)
            try:
                parser.feed(chunk)
            except StreamError as err:
                return _fail(control, f"not a save stream: {err}")
            if parser.offset >= next_progress:
                _say(control, PROGRESS, parser.offset)
                next_progress = parser.offset + PROGRESS_EVERY
    sel.close()
    # The domain is suspended now and xl waits for our "ready" on stdout.
    _say(control, COMPLETE, parser.offset)
    control.recv(64)  # `release`, or EOF if the agent died: either way, go
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m domsnap.agent.drivers.xen_sink OUT CONTROL", file=sys.stderr)
        return 2
    out_path, control_path = args
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.connect(control_path)
    except OSError as err:
        # No banner: xl stops before touching the domain.
        print(f"domsnap xen_sink: cannot reach the agent at {control_path}: {err}", file=sys.stderr)
        return 1
    with control:
        try:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            return _fail(control, f"cannot create {out_path}: {err}")
        try:
            _write_all(sys.stdout.fileno(), BANNER)
            return record(sys.stdin.fileno(), out, control)
        except OSError as err:
            return _fail(control, f"I/O error: {err}")
        finally:
            os.close(out)


if __name__ == "__main__":
    sys.exit(main())
