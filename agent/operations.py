"""Long operations as jobs: states, progress and an abort path, independent of
any RPC stream. A client that leaves only stops watching; the job goes on.

One operation per domain at a time; a second is refused at once (Busy).
(A retried request gets its first operation back: request_ids.py.)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from time import monotonic, time
from typing import Any, Protocol

from . import paging, runner
from .errors import Busy, Cancelled, DomsnapError, FailedPrecondition, InternalError, NotFound
from .progress import Phase, Progress, StepProgress

log = logging.getLogger(__name__)

KEEP_FINISHED = 200


class OpKind(StrEnum):
    CREATE = "create"
    REVERT = "revert"
    DELETE = "delete"


class OpState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL = frozenset({OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELLED})


@dataclass(frozen=True)
class Started:
    operation: Operation


@dataclass(frozen=True)
class Finished:
    operation: Operation


Event = Started | Progress | Finished


@dataclass(eq=False)
class Operation:
    id: str
    kind: OpKind
    domain: str
    snapshot: str
    request_id: str
    state: OpState = OpState.PENDING
    started_at: float = field(default_factory=time)
    finished_at: float | None = None
    progress: Progress = field(default_factory=lambda: Progress(Phase.PENDING))
    result: Any = None
    error: DomsnapError | None = None
    # Past this point a cancel can no longer roll back.
    committed: bool = False
    _watchers: list[asyncio.Queue[Event]] = field(default_factory=list)
    _cancel: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _after: Callable[[], Awaitable[None]] | None = None
    # The progress watchers were told last (note(hold=...) may hold some back).
    _told: Progress | None = None

    # --------------------------------------------------------- for the body

    def phase(self, name: Phase, until: float) -> StepProgress:
        """Enter a phase that ends at `until` percent; returns its progress sink."""
        base = self.progress.percent
        span = max(until - base, 0.0)
        runner.tally_mark(f"phase {name}")
        self._publish(Progress(name, base))

        def report(fraction: float, *, done: int = 0, total: int = 0, rate: float = 0.0, message: str = "") -> None:
            # Never backwards: a phase may report after a nested one began.
            pct = max(base + span * min(max(fraction, 0.0), 1.0), self.progress.percent)
            self._publish(Progress(name, pct, done, total, rate, message))

        return report

    def note(self, *, hold: float = 0.0) -> StepProgress:
        """A sink for a step nested in the current phase, whose own fraction
        says nothing of the phase's: its messages show, the percentage stays.
        `hold`: watchers are told at most every `hold` seconds, the first time
        `hold` seconds in (the operation's own progress, as GetOperation
        answers it, follows every note); `tell` sends what is left untold."""
        told = monotonic()

        def report(fraction: float, *, done: int = 0, total: int = 0, rate: float = 0.0, message: str = "") -> None:
            nonlocal told
            now = self.progress
            progress = Progress(now.phase, now.percent, now.bytes_done, now.bytes_total, now.bytes_per_second,
                                message or now.message)
            if monotonic() - told >= hold:
                told = monotonic()
                self._publish(progress)
            else:
                self.progress = progress

        return report

    def tell(self) -> None:
        """Tell watchers the progress a `note(hold=...)` held back, unless newer progress was told since."""
        if self.progress is not self._told:
            self._publish(self.progress)

    def check_cancel(self) -> None:
        """Called at step boundaries before the point of no return."""
        if self._cancel.is_set():
            raise Cancelled(f"operation {self.id} was cancelled", operation_id=self.id)

    def commit(self) -> None:
        self.check_cancel()
        self.committed = True

    def after_finish(self, work: Callable[[], Awaitable[None]]) -> None:
        """Have `work` run once the operation has finished and that is told:
        what its outcome need not wait for (making durable what its journal
        entry can still redo, then dropping the entry). The domain's next
        operation starts after it."""
        self._after = work

    async def ended(self) -> None:
        """Until the operation has finished, and its `after_finish` work too."""
        if self._task is not None:
            await asyncio.wait({self._task})

    # ------------------------------------------------------------- plumbing

    def _publish(self, progress: Progress) -> None:
        self.progress = self._told = progress
        for q in self._watchers:
            q.put_nowait(progress)

    def _finish(self, state: OpState) -> None:
        self.state = state
        self.finished_at = time()
        for q in self._watchers:
            q.put_nowait(Finished(self))

    async def watch(self) -> AsyncIterator[Event]:
        """Started (as the operation is now), progress from then on, Finished."""
        if self.state in FINAL:
            yield Started(self)
            yield Finished(self)
            return
        # Registered before the first yield: nothing published meanwhile is lost.
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.append(q)
        try:
            yield Started(self)
            while True:
                event = await q.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._watchers.remove(q)


Body = Callable[[Operation], Awaitable[Any]]


def _order(op: Operation) -> tuple[float, str]:
    return (op.started_at, op.id)


class Observer(Protocol):
    """Told when an operation starts running and when it has finished (the
    metrics); it must not raise, and what it raises is logged and dropped."""

    def started(self, op: Operation) -> None: ...

    def finished(self, op: Operation) -> None: ...


class Recorder(Protocol):
    """Keeps each operation beyond the agent's life (op_history.py): told as
    it starts (before its first step) and once it has finished."""

    def record(self, op: Operation) -> None: ...


# Told of every change of an operation's state (the change feed).
OnChange = Callable[[Operation], None]


class Operations:
    def __init__(self, observer: Observer | None = None, recorder: Recorder | None = None,
                 on_change: OnChange | None = None) -> None:
        self._observer = observer
        self._recorder = recorder
        self._on_change = on_change
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._busy: dict[str, Operation] = {}
        # Each domain's last operation, which may still run its `after_finish` work.
        self._last: dict[str, Operation] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, kind: OpKind, domain: str, snapshot: str, request_id: str, body: Body) -> Operation:
        self.check_idle(domain)
        op = Operation(uuid.uuid4().hex[:16], kind, domain, snapshot, request_id)
        self._ops[op.id] = op
        self._busy[domain] = op
        previous = self._last.get(domain)
        self._last[domain] = op
        # Before the body's first step (the task has not run yet): an agent
        # killed from here on leaves the operation known to the next one.
        if self._recorder is not None:
            self._recorder.record(op)
        task = asyncio.get_running_loop().create_task(self._run(op, body, previous), name=f"op-{op.id}")
        op._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._forget_old()
        return op

    def check_idle(self, domain: str) -> None:
        if (running := self._busy.get(domain)) is not None:
            raise Busy(
                f"domain {domain} is busy with operation {running.id} "
                f"({running.kind} snapshot {running.snapshot or '?'}, {running.progress.phase}): wait for it "
                f"(domsnap watch {running.id}) or stop it (domsnap cancel {running.id}), then try again",
                domain=domain, operation_id=running.id,
            )

    def busy_with(self, domain: str) -> Operation | None:
        return self._busy.get(domain)

    async def settled(self, domain: str) -> None:
        """Until the domain's last operation has ended, its `after_finish` work included."""
        if (last := self._last.get(domain)) is not None:
            await last.ended()

    def _tell(self, op: Operation, *, finished: bool) -> None:
        if self._observer is None:
            return
        try:
            (self._observer.finished if finished else self._observer.started)(op)
        except Exception:
            log.exception("operation observer failed on operation %s", op.id)

    async def _run(self, op: Operation, body: Body, previous: Operation | None) -> None:
        op.state = OpState.RUNNING
        self._changed(op)
        self._tell(op, finished=False)
        try:
            if previous is not None:
                # What the domain's last operation left to do after it finished comes first.
                await previous.ended()
            op.result = await body(op)
        except asyncio.CancelledError:
            if not op._cancel.is_set():
                raise  # the agent is shutting down: the journal has the rest
            op.error = Cancelled(f"operation {op.id} was cancelled and rolled back", operation_id=op.id)
        except DomsnapError as err:
            op.error = err
            log.log(logging.INFO if err.caller_fault else logging.ERROR, "operation %s (%s %s) failed: %s",
                    op.id, op.kind, op.domain, err.message, exc_info=not err.caller_fault)
        except Exception as err:
            log.exception("operation %s (%s %s) crashed", op.id, op.kind, op.domain)
            op.error = InternalError(f"operation {op.id} failed unexpectedly: {err}")
            op.error.__cause__ = err
        finally:
            self._busy.pop(op.domain, None)
        if op.error is None:
            op._publish(Progress(Phase.DONE, 100.0))
            op._finish(OpState.SUCCEEDED)
        else:
            op._finish(OpState.CANCELLED if isinstance(op.error, Cancelled) else OpState.FAILED)
        self._tell(op, finished=True)
        # The feed first (no fsync): an agent killed before the record below
        # leaves the outcome there, where the next one finds it.
        self._changed(op)
        if self._recorder is not None:
            # Off the event loop: the record's fsync would stall every call answered meanwhile.
            await asyncio.to_thread(self._recorder.record, op)
        if op._after is not None:
            try:
                await op._after()
            except Exception:
                log.exception("operation %s: what it left to do after it finished failed (its journal entry "
                              "stays: the next agent does it)", op.id)
        if self._last.get(op.domain) is op:
            del self._last[op.domain]

    def _changed(self, op: Operation) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(op)
        except Exception:
            log.exception("the change feed failed on operation %s", op.id)

    def add_finished(self, ops: list[Operation]) -> None:
        """Operations that finished outside this agent's run (a previous agent's, or recovered), oldest first."""
        # Before this run's own, oldest first: the oldest are forgotten first.
        for op in sorted(ops, key=lambda o: o.finished_at or o.started_at, reverse=True):
            self._ops[op.id] = op
            self._ops.move_to_end(op.id, last=False)
        self._forget_old()

    def get(self, op_id: str) -> Operation:
        try:
            return self._ops[op_id]
        except KeyError:
            raise NotFound(f"operation {op_id!r} is unknown (finished long ago, or never existed)",
                           reason="OPERATION_NOT_FOUND", operation_id=op_id) from None

    def page(self, which: Callable[[Operation], bool], size: int, token: str) -> tuple[list[Operation], str]:
        """Up to `size` operations that `which` keeps, newest first, after the
        page `token` ended; and the token of the next page ("" if none)."""
        ops = sorted((o for o in self._ops.values() if which(o)), key=_order, reverse=True)
        if token:
            started_at, op_id = paging.decode(token, repr(which), 2)
            ops = [o for o in ops if _order(o) < (float(started_at), str(op_id))]
        return ops[:size], paging.encode(repr(which), list(_order(ops[size - 1]))) if len(ops) > size else ""

    def cancel(self, op_id: str) -> Operation:
        op = self.get(op_id)
        if op.state in FINAL:
            raise FailedPrecondition(f"operation {op.id} has already {op.state}")
        if op.committed:
            raise FailedPrecondition(f"operation {op.id} is past its point of no return ({op.progress.phase})",
                                     reason="PAST_NO_RETURN", operation_id=op.id)
        op._cancel.set()
        op.state = OpState.CANCELLING
        self._changed(op)
        # Interrupts whatever the operation awaits (a memory save, a copy);
        # its rollback runs on the way out.
        if op._task is not None:
            op._task.cancel()
        return op

    def _forget_old(self) -> None:
        finished = [o for o in self._ops.values() if o.state in FINAL]
        for op in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
            del self._ops[op.id]

    async def drain(self, timeout: float) -> None:
        """Let running operations finish (agent shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
