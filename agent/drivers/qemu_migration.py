"""Memory images through QEMU's migration stream, written to and read from a
file descriptor the agent opened (QEMU never opens a path of ours).

Save: `pause-before-switchover` makes every save stop at `pre-switchover`
with the guest stopped and its disks still active: the disks are snapshotted
there, so RAM and disks are one instant, live or not. (After a migration
*completes* QEMU deactivates the disks, so they cannot be snapshotted then.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from ..errors import AlreadyExists, FailedPrecondition, InternalError, ResourceExhausted
from ..progress import StepProgress
from .pipe_relay import Relay
from .qmp import QmpSession

log = logging.getLogger(__name__)

FDNAME = "domsnap-memory"
POLL = 0.1
# Live pre-copy: the first downtime limit QEMU aims at, doubled with each
# pass over memory up to the last.
FIRST_DOWNTIME_MS = 20
LAST_DOWNTIME_MS = 10_000
# QEMU caps migration at 32 MiB/s by default; a memory image should go at disk speed.
UNLIMITED_BANDWIDTH = 1 << 40
# A live save held ready (a group's member waiting for the others): QEMU
# converges when what is left to send fits in downtime-limit at the measured
# rate, so it is held with the smallest limit, its writes blocked in a pipe
# the agent stops reading (pipe_relay), without ever stopping by itself.
HOLD_DOWNTIME_MS = 1
# Held from when a quarter of the first pass is left to copy (at least 16 MiB,
# at most 64): the end of a pass over untouched memory goes by faster than a
# QMP round trip, and QEMU may converge there. Checked this often:
READY_BYTES = (16 << 20, 64 << 20)
READY_POLL = 0.005
# Released, a held save copies what is left of its pass and what its guest
# dirtied meanwhile, the guest still running, until QEMU converges and stops
# the guest by itself (it then has least left to send); a guest that dirties
# too fast for that is stopped after this long, in seconds.
CATCH_UP = 0.15
# `cont` refused because QEMU still finalizes the save is asked again this
# often (the guest waits paused meanwhile; a retry is one QMP round trip),
# for at most half a second.
CONT_RETRY = 0.001
CONT_TRIES = 500


@dataclass(frozen=True)
class SaveResult:
    memory_bytes: int
    stopped_at: float | None
    resumed_at: float | None
    # How the memory was written while the guest ran; None: it was stopped throughout.
    mode: LiveMode | None = None


def _open_new(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as err:
        raise AlreadyExists(f"memory image {path} already exists", reason="PATH_EXISTS", path=str(path)) from err


def _raise_relay_failed(relay: Relay) -> None:
    # QEMU only sees its pipe break: the relay knows why.
    if relay.disk_full:
        raise ResourceExhausted(f"writing the memory image: the disk is full ({relay.error})")
    if relay.error is not None:
        raise InternalError(f"writing the memory image failed: {relay.error}")


def _raise_failed(info: dict[str, Any], what: str) -> None:
    desc = str(info.get("error-desc", "no reason given"))
    if "No space left" in desc:
        raise ResourceExhausted(f"{what}: the disk is full ({desc})")
    raise InternalError(f"{what} failed: {desc}")


class _Rate:
    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def of(self, done: int) -> float:
        return done / max(time.monotonic() - self._t0, 1e-6)


class LiveMode(StrEnum):
    # Pre-copy while the guest runs, stopping at pre-switchover: the image
    # holds the state at the end; the pause grows with the dirty rate.
    PRECOPY = "precopy"
    # QEMU's background-snapshot: stop, disks, then RAM is written
    # copy-on-write while the guest runs: the image holds the state at the
    # start; the pause is the device state only, whatever the dirty rate.
    BACKGROUND = "background"


# Before 9.0, QEMU's pre-copy clears the migration dirty bitmap 64 pages at
# a time without flagging TCG's TLB entries again, so a vCPU keeps writing
# through them unseen: the image misses guest writes made during the copy
# (fixed by "physmem: Fix migration dirty bitmap coherency with TCG memory
# access"). KVM tracks dirty pages itself; background snapshots write-protect
# guest memory instead of tracking it.
TCG_PRECOPY_FIXED = (9, 0)


def precopy_loses_writes(version: str, accel: str) -> bool:
    """Whether a live pre-copy of a guest under `accel` by QEMU `version`
    (as parse_version gives it: "QEMU 7.2.19") can miss guest writes."""
    m = re.match(r"QEMU (\d+)\.(\d+)", version)
    return accel == "tcg" and m is not None and (int(m[1]), int(m[2])) < TCG_PRECOPY_FIXED


def live_mode_for(configured: str, version: str, accel: str) -> LiveMode:
    """The mode a live save of a guest under `accel` by QEMU `version` takes
    when [qemu] live_mode is `configured`: "auto" writes memory in the
    background where a pre-copy would lose the guest's writes."""
    if configured != "auto":
        return LiveMode(configured)
    return LiveMode.BACKGROUND if precopy_loses_writes(version, accel) else LiveMode.PRECOPY


async def save(
    qmp: QmpSession,
    memory: Path,
    *,
    live: bool,
    was_running: bool,
    in_pause: Callable[[], Awaitable[None]],
    progress: StepProgress,
    mode: LiveMode = LiveMode.PRECOPY,
    bandwidth: int = 0,
    before_pause: Callable[[], Awaitable[None]] | None = None,
    before_resume: Callable[[], Awaitable[None]] | None = None,
) -> SaveResult:
    """Write the memory image (not synced: the caller's, see Hypervisor.checkpoint);
    run `in_pause` at the instant it captures; leave the guest in the run
    state it had (running again when `was_running`).
    `bandwidth` caps the write in bytes/s (0: as fast as the disk takes it).
    `before_pause` is awaited when the guest is ready to pause (live: its
    memory copied once and the copy held there); the guest pauses after it.
    `before_resume` is awaited, the guest still stopped, once all that can be
    saved without resuming it is: a pre-copy's whole image, a background
    snapshot's disks (its `migrate` resumes the guest)."""
    # A paused guest has nothing to gain from a live save, and background
    # snapshots resume the guest by themselves (QEMU 7.2): paused ones take
    # the plain path. A held save (`before_pause`) may take either mode: a
    # background snapshot's pause is the agent's own `stop`, held like any.
    background = live and was_running and mode is LiveMode.BACKGROUND
    await _set_capabilities(qmp, background=background)
    # Held in pre-copy (_hold); a background snapshot holds nothing in QEMU.
    held = live and was_running and before_pause is not None and not background
    full = bandwidth or UNLIMITED_BANDWIDTH
    # A stopped guest's save too: the limit decides when QEMU leaves its
    # passes for the completion (a leftover one, from a pre-copy that raised
    # it, would move the whole image into that last step).
    await _set_parameters(qmp, {"max-bandwidth": full,
                                "downtime-limit": HOLD_DOWNTIME_MS if held else FIRST_DOWNTIME_MS})
    fd = _open_new(memory)
    relay: Relay | None = None
    stopped = resumed = None
    try:
        if held:
            relay = Relay(fd)
        async with qmp.listen("STOP", "RESUME") as events, qmp.listen("MIGRATION") as changes:
            try:
                await qmp.send_fd(FDNAME, fd if relay is None else relay.write_end)
            finally:
                if relay is not None:
                    relay.close()
            watch = _Watch(qmp, fd, changes, progress)
            if background:
                await _save_background(qmp, watch, in_pause, before_pause, before_resume)
            else:
                await _save_precopy(qmp, watch, live=live and was_running, was_running=was_running,
                                    in_pause=in_pause, relay=relay, before_pause=before_pause,
                                    before_resume=before_resume)
            if relay is not None:
                await relay.drained()
                _raise_relay_failed(relay)
            size = os.fstat(fd).st_size
            for event in events.clear():
                if event["event"] == "STOP" and stopped is None:
                    stopped = _stamp(event)
                elif event["event"] == "RESUME":
                    resumed = _stamp(event)
    except BaseException:
        if relay is not None:
            # Ended before the image's descriptor is closed under it.
            await relay.stop()
        with contextlib.suppress(FileNotFoundError):
            memory.unlink()
        if relay is not None:
            _raise_relay_failed(relay)
        raise
    finally:
        os.close(fd)
    progress(1.0, done=size, total=size, message="memory image written")
    return SaveResult(size, stopped, resumed, mode if live and was_running else None)


def _capabilities_args(states: Mapping[str, object]) -> Mapping[str, object]:
    return {"capabilities": [{"capability": name, "state": state} for name, state in states.items()]}


async def learn_settings(qmp: QmpSession) -> None:
    """The migration settings QEMU has now, told to its session (as the agent
    attaches to it): the next save sets only those that differ."""
    await qmp.learn("migrate-set-capabilities", "query-migrate-capabilities",
                    lambda caps: {str(c["capability"]): c["state"] for c in caps})
    await qmp.learn("migrate-set-parameters", "query-migrate-parameters", dict)


async def _set_parameters(qmp: QmpSession, values: Mapping[str, object]) -> None:
    await qmp.settle("migrate-set-parameters", values, dict)


async def _set_capabilities(qmp: QmpSession, *, background: bool) -> None:
    try:
        await qmp.settle("migrate-set-capabilities", {
            "pause-before-switchover": not background,
            "background-snapshot": background,
            # MIGRATION events wake the agent the moment the guest is stopped at
            # pre-switchover, instead of at its next poll.
            "events": True,
        }, _capabilities_args)
    except FailedPrecondition as err:
        if not background:
            raise
        # QEMU 7.2 opens userfaultfd(2) by the syscall alone (later ones try
        # /dev/userfaultfd first), which without CAP_SYS_PTRACE handles kernel
        # faults only when the sysctl allows it.
        raise FailedPrecondition(
            f"{err.message}: a background snapshot write-protects guest memory with userfaultfd(2), which "
            "QEMU 7.2 may open only with CAP_SYS_PTRACE (domsnapd.service keeps it) or where the sysctl "
            "vm.unprivileged_userfaultfd is 1; or take the snapshot without --live", domain=qmp.name,
        ) from err


async def _save_precopy(
    qmp: QmpSession, watch: _Watch, *, live: bool, was_running: bool, in_pause: Callable[[], Awaitable[None]],
    relay: Relay | None = None, before_pause: Callable[[], Awaitable[None]] | None = None,
    before_resume: Callable[[], Awaitable[None]] | None = None,
) -> None:
    if before_pause is not None and not live:
        await before_pause()
    if was_running and not live:
        await qmp.execute("stop")
    try:
        await qmp.execute("migrate", {"uri": f"fd:{FDNAME}"})
        held = False
        if before_pause is not None and relay is not None:
            await _hold(qmp, watch, relay, before_pause)
            held = True
        # Every MIGRATION event since `migrate` is heard (the listener came
        # first): QEMU is asked first only after a hold, whose polls read some.
        await watch.until("pre-switchover", live=live, ask=held)
        await in_pause()
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})
        # Its event is sure to come: nothing else waits on this save now.
        await watch.until("completed", live=live, ask=False)
        if before_resume is not None:
            # The image is complete and the guest stays stopped (postmigrate) until `cont`.
            await before_resume()
    except BaseException:
        if relay is not None:
            # A writer blocked in the pipe would not see the cancel.
            relay.release()
        await _cancel(qmp)
        raise
    finally:
        if was_running:
            # cont also reactivates the disks QEMU handed over at completion.
            await _cont(qmp)


async def _hold(qmp: QmpSession, watch: _Watch, relay: Relay, before_pause: Callable[[], Awaitable[None]]) -> None:
    """Pre-copy until the guest is ready to pause, hold the copy there (its
    writes paced by the relay, the guest running) through `before_pause`,
    then let it catch up until the guest pauses: the little left is sent with
    the guest stopped, which then waits at pre-switchover."""
    if await watch.until_ready():
        relay.hold()
    else:
        log.info("live save: QEMU converged within its first pass; the guest waits paused")
    await before_pause()
    relay.release()
    if not await watch.until_converged(CATCH_UP):
        await qmp.execute("stop")


async def _save_background(qmp: QmpSession, watch: _Watch, in_pause: Callable[[], Awaitable[None]],
                           before_pause: Callable[[], Awaitable[None]] | None,
                           before_resume: Callable[[], Awaitable[None]] | None) -> None:
    if before_pause is not None:
        await before_pause()
    await qmp.execute("stop")
    try:
        await in_pause()
        if before_resume is not None:
            await before_resume()
        await qmp.execute("migrate", {"uri": f"fd:{FDNAME}"})
    except BaseException:
        await qmp.execute("cont")
        raise
    # From here QEMU resumes the guest itself as soon as the device state is
    # saved; if the stream fails later the guest just keeps running.
    try:
        await watch.until("completed", live=False)
    except BaseException:
        await _cancel(qmp)
        raise


async def _cont(qmp: QmpSession) -> None:
    """`cont`, retried while QEMU still finalizes a migration it reported
    completed (no event says when that is done: its main loop leaves the
    finish-migrate state a moment after the migration thread's event)."""
    for _ in range(CONT_TRIES):
        try:
            await qmp.execute("cont")
            return
        except FailedPrecondition as err:
            if "not finalized" not in err.message:
                raise
            await asyncio.sleep(CONT_RETRY)
    await qmp.execute("cont")


def _stamp(event: Mapping[str, Any]) -> float:
    t = event["timestamp"]
    return float(t["seconds"]) + float(t["microseconds"]) / 1e6


class _Watch:
    """Follows a save: progress while it runs, and (live pre-copy) a downtime
    limit that starts small and doubles with each pass over memory, so that
    an idle guest converges with a pause of a few ms and a busy one still
    converges."""

    def __init__(self, qmp: QmpSession, fd: int, changes: EventListener, progress: StepProgress) -> None:
        self._qmp = qmp
        self._fd = fd
        self._changes = changes
        self._progress = progress
        self._rate = _Rate()
        self._downtime = FIRST_DOWNTIME_MS
        self._passes = 0

    async def until(self, wanted: str, *, live: bool, ask: bool = True) -> None:
        """Until the save's status is `wanted`. Its MIGRATION events tell each
        status; QEMU is asked (query-migrate) when POLL passes without one
        (for the progress, or a QEMU gone) and when the save ends otherwise
        (for why); `ask`: first too (a status reached before, its event read
        by another wait). Not asked on the way: a query takes QEMU's main
        lock, which its migration thread needs to complete the save while
        the guest is paused."""
        while True:
            if ask:
                info = await self._qmp.execute("query-migrate")
                status = info.get("status")
                if status == wanted:
                    return
                if status in ("failed", "cancelled") or (status == "completed" and wanted != "completed"):
                    _raise_failed(info, "writing the memory image")
                await self._report(info, live=live)
            told = await _next_change(self._changes)
            if told == wanted:
                return
            ask = told is None or told in _ENDED

    async def _report(self, info: dict[str, Any], *, live: bool) -> None:
        """Progress (and, live, the downtime limit) from a query-migrate's answer."""
        status = info.get("status")
        ram = info.get("ram", {})
        if live and status == "active":
            await self._adapt(int(ram.get("dirty-sync-count", 0)))
        total = int(ram.get("total", 0))
        written = position(self._fd)
        if total and status == "active":
            remaining = int(ram.get("remaining", total))
            fraction = 1 - remaining / total if live else min(written / total, 1.0)
            self._progress(min(fraction, 0.99), done=written, total=total, rate=self._rate.of(written),
                           message=f"memory: {status}")

    async def until_ready(self) -> bool:
        """Until the first pass over memory is nearly done (True), or QEMU
        converged first and stopped the guest (False)."""
        while True:
            info = await self._qmp.execute("query-migrate")
            status = info.get("status")
            if status == "pre-switchover":
                return False
            if status not in ("setup", "active"):
                _raise_failed(info, "writing the memory image")
            ram = info.get("ram", {})
            least, most = READY_BYTES
            ready = max(least, min(int(ram.get("total", 0)) // 4, most))
            if status == "active" and (int(ram.get("dirty-sync-count", 0)) > 1
                                       or int(ram.get("remaining", ready + 1)) <= ready):
                return True
            await asyncio.sleep(READY_POLL)

    async def until_converged(self, within: float) -> bool:
        """Until QEMU converged by itself and stopped the guest (True), or `within` seconds went by with
        the save still active (False)."""
        deadline = time.monotonic() + within
        while (await self._qmp.execute("query-migrate")).get("status") == "active":
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changes.get(), left)
        return True

    async def _adapt(self, passes: int) -> None:
        # Another pass over memory (dirty-sync-count went up): the last limit
        # was too tight for this guest's dirty rate.
        if self._passes and passes > self._passes and self._downtime < LAST_DOWNTIME_MS:
            self._downtime = min(self._downtime * 2, LAST_DOWNTIME_MS)
            await _set_parameters(self._qmp, {"downtime-limit": self._downtime})
        self._passes = max(self._passes, passes)


def position(fd: int) -> int:
    """The file position QEMU's copy of `fd` shares with ours: exactly the
    bytes it has written (or read) so far. Read from /proc, not with lseek:
    lseek waits for the file's position lock, which QEMU holds through each
    write of a large buffer; measured here, up to a second of the event
    loop stalled under load, where /proc answers in microseconds."""
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    return int(text.split(b"pos:", 1)[1].split(b"\n", 1)[0])


async def _next_change(changes: EventListener) -> str | None:
    """Until the next MIGRATION status change, or POLL (to report progress);
    the status it changed to (None: none did). The status awaited, once
    told, is taken as it is: asked again, QEMU answers only once its main
    loop is free, in the guest's pause a round trip more."""
    try:
        # A deadline, not wait_for's task: told in the guest's pause, the
        # status reaches the save a loop turn sooner.
        async with asyncio.timeout(POLL):
            event = await changes.get()
    except TimeoutError:
        return None
    data = event.get("data")
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


# The statuses a save ends in.
_ENDED = frozenset({"completed", "failed", "cancelled"})
IN_FLIGHT = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"})


async def cancel_in_flight(qmp: QmpSession) -> None:
    """Cancel an outgoing save that is still under way (left by a dead agent)."""
    info = await qmp.execute("query-migrate")
    if info.get("status") in IN_FLIGHT:
        await _cancel(qmp)


async def _cancel(qmp: QmpSession) -> None:
    with contextlib.suppress(Exception):
        await qmp.execute("migrate_cancel")
        for _ in range(100):
            info = await qmp.execute("query-migrate")
            if info.get("status") in ("cancelled", "failed", "completed"):
                return
            await asyncio.sleep(POLL)


async def load(qmp: QmpSession, memory: Path, *, progress: StepProgress) -> None:
    """Feed a memory image to a QEMU started with `-incoming defer`; it ends paused."""
    fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = os.fstat(fd).st_size
        # QEMU's loader reads in small pieces on one thread: read ahead for it.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        # MIGRATION events wake the agent the moment the load completes,
        # instead of at its next poll.
        await qmp.settle("migrate-set-capabilities", {"events": True}, _capabilities_args)
        async with qmp.listen("MIGRATION") as changes:
            await qmp.send_fd(FDNAME, fd)
            await qmp.execute("migrate-incoming", {"uri": f"fd:{FDNAME}"})
            rate = _Rate()
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    _raise_failed(info, "loading the memory image")
                done = position(fd)
                progress(min(done / max(total, 1), 0.99), done=done, total=total, rate=rate.of(done),
                         message="memory: loading")
                if await _next_change(changes) == "completed":
                    break
        progress(1.0, done=total, total=total, message="memory image loaded")
    finally:
        os.close(fd)
