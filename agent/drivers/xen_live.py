"""The agent's side of a live Xen snapshot: `xl migrate` into our sink.

Order of events (the lab's findings, xl_migrate.c: migrate_domain):

1. xl runs the sink, reads its banner and sends the header, then libxl's live
   save: pre-copy rounds while the guest runs, then the guest is suspended
   and the rest sent, up to libxl's END record.
2. The sink reports `complete` on CONTROL. The domain is suspended, xl waits
   for the receiver's "ready": `in_pause` runs now, once.
3. The agent releases the sink, which exits without "ready"; xl says
   "Migration failed, resuming at sender." and resumes the domain.

Success is judged from what the sink saw and that line, never from xl's exit
status (always 1 on this path). xl is never killed while the domain may be
suspended: on any failure or cancellation the sink is released and xl is left
to resume the domain and exit by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import FailedPrecondition, InternalError
from ..progress import StepProgress
from ..runner import CommandResult, Runner
from . import xen_sink

RESUMED: Final = "Migration failed, resuming at sender."
NOT_SUSPENDED: Final = "Migration failed, failed to suspend at sender."
# libxc, when Xen cannot track dirty pages for this guest (PV without shadow paging).
NO_LOGDIRTY: Final = "Failed to enable logdirty"
CONTROL_SOCKET: Final = "control.sock"
# The disks are snapshotted while the domain is suspended; past this, give up
# and let xl resume it. xl's own timeout covers the stream, this and a margin,
# so the runner never kills xl while the domain may be suspended.
IN_PAUSE_TIMEOUT: Final = 3600.0
RESUME_MARGIN: Final = 120.0


@dataclass(frozen=True)
class LiveSaveResult:
    memory_bytes: int
    # From the sink's "complete" to xl's exit after resuming: the part of the
    # guest's pause the agent can see (the final copy round before it is not).
    downtime: float


class _Control:
    """CONTROL: a unix socket in a private (0700) temporary directory; the one
    sink xl starts connects to it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="domsnap-xen-"))
        self.path = self.dir / CONTROL_SOCKET
        self.messages: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._released = False

    async def __aenter__(self) -> _Control:
        self._server = await asyncio.start_unix_server(self._accept, self.path)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            writer.close()  # only xl's one sink may talk to us
            return
        self._writer = writer
        if self._released:
            # Released before the sink even connected (a failure or a cancel
            # that early): it must go at once, or xl would wait on it.
            await self.release()
        while line := await reader.readline():
            kind, _, arg = line.decode(errors="replace").strip().partition(" ")
            await self.messages.put((kind, arg))
        await self.messages.put(("eof", ""))

    async def release(self) -> None:
        self._released = True
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(OSError):
                self._writer.write(f"{xen_sink.RELEASE}\n".encode())
                await self._writer.drain()


def _tail(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return " / ".join(lines[-3:]) or "(nothing on stderr)"


def _failure(domain: str, why: str, stderr: str) -> Exception:
    if NO_LOGDIRTY in stderr:
        return FailedPrecondition(
            f"domain {domain}: Xen cannot track the guest's dirty pages (\"{NO_LOGDIRTY}\"), so a live "
            "snapshot is impossible; a PV guest needs a hypervisor built with shadow paging. The domain "
            "kept running. Take a non-live snapshot instead."
        )
    return InternalError(f"live snapshot of domain {domain} failed: {why}; xl: {_tail(stderr)}")


async def _until_complete(
    control: _Control, xl: asyncio.Task[CommandResult], progress: StepProgress, expected: int, domain: str,
) -> int:
    """Bytes in the image once the sink saw libxl's END; raises when xl or the sink gave up."""
    t0 = time.monotonic()
    while True:
        get = asyncio.ensure_future(control.messages.get())
        try:
            done, _pending = await asyncio.wait({get, xl}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
        if get not in done:
            raise _failure(domain, "xl ended before the stream was complete", xl.result().stderr)
        kind, arg = get.result()
        if kind == xen_sink.COMPLETE:
            return int(arg)
        if kind == xen_sink.PROGRESS:
            sent = int(arg)
            rate = sent / max(time.monotonic() - t0, 1e-6)
            # Pre-copy sends memory more than once: the size is only a guide.
            progress(min(sent / max(expected, 1), 0.99), done=sent, total=expected, rate=rate,
                     message="memory: live pre-copy")
            continue
        why = f"the sink reported: {arg}" if kind == xen_sink.FAILED else "the sink went away"
        await asyncio.shield(xl)
        raise _failure(domain, why, xl.result().stderr)


async def live_save(
    run: Runner,
    argv_for: Callable[[Path], list[str]],
    *,
    domain: str,
    in_pause: Callable[[], Awaitable[None]],
    progress: StepProgress,
    expected_bytes: int,
    timeout: float,
) -> LiveSaveResult:
    """Run `xl migrate` (argv_for(control socket)) into the sink, allowing
    `timeout` seconds for the stream, and `in_pause` while the domain is
    suspended at its end."""
    xl_timeout = timeout + IN_PAUSE_TIMEOUT + RESUME_MARGIN
    async with _Control() as control:
        xl = asyncio.create_task(run(argv_for(control.path), timeout=xl_timeout, check=False))
        try:
            try:
                size = await asyncio.wait_for(
                    _until_complete(control, xl, progress, expected_bytes, domain), timeout)
            except TimeoutError as err:
                raise InternalError(f"live snapshot of domain {domain}: the stream was not complete "
                                    f"after {timeout:.0f} s") from err
            stopped = time.monotonic()
            try:
                await asyncio.wait_for(in_pause(), IN_PAUSE_TIMEOUT)
            except TimeoutError as err:
                raise InternalError(f"live snapshot of domain {domain}: the disk snapshots took over "
                                    f"{IN_PAUSE_TIMEOUT:.0f} s; the domain was resumed") from err
        finally:
            # Whatever happened, let the sink go: xl then resumes the domain
            # and exits by itself (it is never killed while the domain may be
            # suspended).
            await control.release()
            result = await asyncio.shield(xl)
        downtime = time.monotonic() - stopped
    if RESUMED not in result.stderr:
        raise InternalError(f"live snapshot of domain {domain}: xl did not report resuming the domain; "
                            f"xl: {_tail(result.stderr)}")
    progress(1.0, done=size, total=size, message="memory image written")
    return LiveSaveResult(size, downtime)
