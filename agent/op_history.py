"""What became of operations, kept across agent restarts.

Each operation leaves `operations/<id>.json` in the state dir (its kind,
domain, snapshot, request id, times, outcome and error), written as it
starts and again once it has finished; so does each
operation a dead agent left in the journal, once the next agent has
finished or rolled it back. A new agent lists those of its predecessors with
their outcome; records older than `keep` seconds (30 days by default, as
AIP-151 suggests for finished long-running operations) are removed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import errors
from .errors import DomsnapError, InternalError
from .fsutil import read_regular, write_atomic
from .operations import FINAL, Operation, OpKind, OpState

log = logging.getLogger(__name__)

MAX_RECORD = 64 << 10
DAY = 86400.0


def _error(name: str, message: str, reason: str, metadata: dict[str, str]) -> DomsnapError:
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DomsnapError)):
        cls = InternalError
    # A class with fields of its own (CommandError's argv) comes back as the
    # nearest one that has none: same code, same reason.
    base = next(c for c in cls.__mro__ if issubclass(c, DomsnapError) and c.__init__ is DomsnapError.__init__)
    return base(message, reason=reason, **metadata)


class History:
    def __init__(self, state_dir: Path, keep: float = 30 * DAY) -> None:
        self._dir = state_dir / "operations"
        self._keep = keep

    def record(self, op: Operation) -> None:
        """Called as an operation starts and once it has finished; a failure to write is logged, never raised."""
        data = {"id": op.id, "kind": str(op.kind), "domain": op.domain, "snapshot": op.snapshot,
                "request_id": op.request_id, "state": str(op.state), "started_at": op.started_at,
                "finished_at": op.finished_at, "message": op.progress.message}
        if op.error is not None:
            data["error"] = {"class": type(op.error).__name__, "message": op.error.message,
                             "reason": op.error.reason, "metadata": op.error.metadata}
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # As it starts, on the event loop: no fsync (7 ms here), which
            # only a power cut, not the agent's death, would need.
            write_atomic(self._dir / f"{op.id}.json", json.dumps(data), durable=op.state in FINAL)
        except OSError as err:
            log.warning("operation %s: its record could not be kept: %s", op.id, err)

    def load(self) -> list[Operation]:
        """The recorded operations younger than `keep`; older records are removed.
        One not finished was running when its agent died: the caller finishes it."""
        if not self._dir.is_dir():
            return []
        now, out = time.time(), []
        for path in sorted(self._dir.glob("*.json")):
            try:
                data = json.loads(read_regular(path, MAX_RECORD))
                op = Operation(data["id"], OpKind(data["kind"]), data["domain"], data["snapshot"],
                               data["request_id"], state=OpState(data["state"]), started_at=data["started_at"],
                               finished_at=data["finished_at"])
                if "error" in data:
                    error = data["error"]
                    op.error = _error(error["class"], error["message"], str(error.get("reason", "")),
                                      {str(k): str(v) for k, v in dict(error.get("metadata", {})).items()})
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("operation record %s is unreadable (%s); removing it", path, err)
                path.unlink(missing_ok=True)
                continue
            if now - (op.finished_at or op.started_at) > self._keep:
                path.unlink(missing_ok=True)
                continue
            out.append(op)
        return out
