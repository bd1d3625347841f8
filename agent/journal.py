"""The operations journal: before each step of an operation runs, its intent
is written durably to `<state_dir>/journal/<op-id>.json`, so that an agent
restarted after a crash (or `kill -9`) finds what was under way and finishes
or rolls it back (AgentService.recover hands each entry to the `recover` of
its procedure: SnapshotCreate, SnapshotRevert or SnapshotDelete). A finished
operation's entry is removed.

Fault injection for tests: with `[testing] fault_injection = true` in the
config, the environment variable DOMSNAP_KILL_AT=<kind>:<step> (e.g.
`create:disk:xvda`) makes the agent SIGKILL itself right after journaling
that step, before running it; DOMSNAP_FAIL_AT=<kind>:<step>:<n> makes that
step fail (InternalError) the first n times it is reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import runner
from .errors import InternalError
from .fsutil import write_atomic

log = logging.getLogger(__name__)

KILL_ENV = "DOMSNAP_KILL_AT"
FAIL_ENV = "DOMSNAP_FAIL_AT"


@dataclass
class JournalEntry:
    op_id: str
    kind: str
    domain: str
    snapshot: str
    request_id: str
    # What recovery needs to undo or redo the operation (paths, records).
    data: dict[str, Any]
    steps: list[str] = field(default_factory=list)

    def reached(self, step: str) -> bool:
        return step in self.steps


class Journal:
    def __init__(self, state_dir: Path, *, fault_injection: bool = False) -> None:
        self._dir = state_dir / "journal"
        self._kill_at = os.environ.get(KILL_ENV, "") if fault_injection else ""
        if self._kill_at:
            log.warning("fault injection armed: the agent kills itself at step %s", self._kill_at)
        fail_at, _, times = (os.environ.get(FAIL_ENV, "") if fault_injection else "").rpartition(":")
        self._fail_at, self._failures_left = fail_at, int(times) if fail_at else 0
        if self._fail_at:
            log.warning("fault injection armed: step %s fails %d time(s)", self._fail_at, self._failures_left)

    def _path(self, op_id: str) -> Path:
        return self._dir / f"{op_id}.json"

    def _write(self, entry: JournalEntry) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(entry.op_id), json.dumps(asdict(entry)), mode=0o600)

    # The writes run off the event loop (their fsyncs would stall every
    # other call the agent answers meanwhile); each is awaited, so a step is
    # durable before it runs.

    async def begin(self, entry: JournalEntry) -> None:
        await asyncio.to_thread(self._write, entry)

    async def step(self, entry: JournalEntry, step: str, **data: Any) -> None:
        """Record durably that `step` is about to run (with what undoing it needs)."""
        entry.steps.append(step)
        entry.data.update(data)
        await asyncio.to_thread(self._write, entry)
        runner.tally_mark(f"journal {step}")
        self._kill_point(entry, step)

    def mark(self, entry: JournalEntry, step: str) -> None:
        """Record that `step` is about to run, for this process only: for a
        step whose undo (or redo) the last durable step already covers, where
        a write would cost more than it tells (inside a guest's pause). A
        kill point for the tests like any step."""
        entry.steps.append(step)
        self._kill_point(entry, step)

    def _kill_point(self, entry: JournalEntry, step: str) -> None:
        if self._kill_at == f"{entry.kind}:{step}":
            log.warning("fault injection: killing the agent at %s:%s", entry.kind, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fail_at == f"{entry.kind}:{step}" and self._failures_left > 0:
            self._failures_left -= 1
            raise InternalError(f"fault injection: step {entry.kind}:{step} failed")

    async def finish(self, entry: JournalEntry) -> None:
        await asyncio.to_thread(self.close, entry)

    def close(self, entry: JournalEntry) -> None:
        """`finish` for a caller already off the event loop (one thread hop for its last steps)."""
        self._path(entry.op_id).unlink(missing_ok=True)

    def pending(self) -> list[JournalEntry]:
        if not self._dir.is_dir():
            return []
        entries = []
        for path in sorted(self._dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                entries.append(JournalEntry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as err:
                log.error("journal entry %s is unreadable (%s); moving it aside", path, err)
                path.rename(path.with_suffix(".corrupt"))
        return entries
