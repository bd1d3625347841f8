"""The change feed: every change the agent makes, in order, each once, with a
token to resume from (WatchEvents).

An event is committed to `events.sqlite` in the state directory before any
watcher sees it, so a watcher that resumes from the last token it got, after
a dropped stream or a `kill -9` of the agent, misses none and gets none
twice. Sequence numbers only grow (AUTOINCREMENT never reuses one). A token
is the feed's epoch (made with the file) and a sequence number: a token of a
file made anew (unusable, or another agent's state) or older than what the
feed keeps (`keep` seconds, at most `max_events`) is refused with
EventsExpired, which tells the watcher to list again.

Watchers read the file, never a queue: one that falls behind costs nothing
but its own reads, and an append only wakes them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from time import time

from .errors import EventsExpired, InvalidArgument
from .sqlite_file import open_db

log = logging.getLogger(__name__)

FILE = "events.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    domain TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    operation_id TEXT NOT NULL,
    operation_state TEXT NOT NULL,
    operation_kind TEXT NOT NULL,
    previous_name TEXT NOT NULL,
    domain_uid TEXT NOT NULL
);
CREATE INDEX events_domain ON events (domain, seq);
CREATE TABLE feed (epoch TEXT NOT NULL, pruned_through INTEGER NOT NULL);
"""
_INSERT = ("INSERT INTO events (time, kind, domain, snapshot, operation_id, operation_state, operation_kind, "
           "previous_name, domain_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SELECT = ("SELECT seq, time, kind, domain, snapshot, operation_id, operation_state, operation_kind, previous_name, "
           "domain_uid ")
# After a position: everything, or one domain's.
_READ = {False: _SELECT + "FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
         True: _SELECT + "FROM events WHERE seq > ? AND domain = ? ORDER BY seq LIMIT ?"}
MAX_EVENTS = 100_000
# Pruning runs every this many appends (and at start).
_PRUNE_EVERY = 1000
_BATCH = 500


class ChangeKind(StrEnum):
    OPERATION = "operation"
    DOMAIN_CREATED = "domain_created"
    DOMAIN_DESTROYED = "domain_destroyed"
    DOMAIN_PAUSED = "domain_paused"
    DOMAIN_UNPAUSED = "domain_unpaused"
    DOMAIN_REVERTED = "domain_reverted"
    DOMAIN_MEDIUM_CHANGED = "domain_medium_changed"
    SNAPSHOT_CREATED = "snapshot_created"
    SNAPSHOT_DELETED = "snapshot_deleted"
    SNAPSHOT_EDITED = "snapshot_edited"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    domain: str
    snapshot: str = ""
    operation_id: str = ""
    # The operations' own terms (operations.OpState, OpKind), as text.
    operation_state: str = ""
    operation_kind: str = ""
    previous_name: str = ""
    domain_uid: str = ""


@dataclass(frozen=True)
class Event:
    token: str
    seq: int
    time: float
    change: Change


class Feed:
    def __init__(self, state_dir: Path, keep: float, max_events: int = MAX_EVENTS) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        self._max = max_events
        self._db, made = open_db(state_dir / FILE, _SCHEMA, SCHEMA_VERSION, what="event feed",
                                 if_unusable="starting a new one (watchers' tokens expire: they list again)")
        if made:
            self._db.execute("INSERT INTO feed (epoch, pruned_through) VALUES (?, 0)", (secrets.token_hex(6),))
        self._epoch: str = self._db.execute("SELECT epoch FROM feed").fetchone()[0]
        self._appended = 0
        self._wakers: set[asyncio.Event] = set()
        self._prune()

    def close(self) -> None:
        self._db.close()

    def _token(self, seq: int) -> str:
        return f"{self._epoch}-{seq}"

    def _last(self) -> int:
        found = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(found[0]) if found else 0

    def token(self) -> str:
        """The feed's position now: watching from it gives every later change."""
        return self._token(self._last())

    def append(self, change: Change) -> Event:
        """Committed first, then the watchers woken."""
        c = change
        now = time()
        with self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute(_INSERT, (now, str(c.kind), c.domain, c.snapshot, c.operation_id,
                                                c.operation_state, c.operation_kind, c.previous_name,
                                                c.domain_uid))
        seq = cursor.lastrowid
        assert seq is not None
        for waker in self._wakers:
            waker.set()
        self._appended += 1
        if self._appended % _PRUNE_EVERY == 0:
            self._prune()
        return Event(self._token(seq), seq, now, change)

    def operation_state(self, op_id: str) -> str:
        """The last state the feed told of an operation ("" if none)."""
        found = self._db.execute("SELECT operation_state FROM events WHERE kind = ? AND operation_id = ? "
                                 "ORDER BY seq DESC LIMIT 1", (str(ChangeKind.OPERATION), op_id)).fetchone()
        return str(found[0]) if found else ""

    def _prune(self) -> None:
        floor = max(self._last() - self._max, 0)
        with self._db:
            self._db.execute("BEGIN")
            found = self._db.execute("SELECT max(seq) FROM events WHERE seq <= ? OR time < ?",
                                     (floor, time() - self._keep)).fetchone()[0]
            if found is None:
                return
            self._db.execute("DELETE FROM events WHERE seq <= ?", (found,))
            self._db.execute("UPDATE feed SET pruned_through = ?", (found,))

    def _position(self, token: str) -> int:
        """The sequence number a token stands for; refused when the feed no longer holds what follows it."""
        if not token:
            return self._last()
        epoch, _, number = token.rpartition("-")
        if not epoch or not number.isdigit():
            raise InvalidArgument(f"since {token!r} is not an event token this agent gave out",
                                  reason="INVALID_EVENT_TOKEN", field="since")
        seq = int(number)
        pruned: int = self._db.execute("SELECT pruned_through FROM feed").fetchone()[0]
        if epoch != self._epoch or seq > self._last():
            raise EventsExpired(f"event token {token!r} is from another feed (the agent's state was made anew): "
                                "list again, then watch from AgentInfo.event_token", since=token)
        if seq < pruned:
            raise EventsExpired(f"event token {token!r} is older than the events this agent keeps (after "
                                f"{self._token(pruned)}): list again, then watch from AgentInfo.event_token",
                                since=token)
        return seq

    def _read(self, after: int, domain: str) -> list[Event]:
        args = (after, domain, _BATCH) if domain else (after, _BATCH)
        rows = self._db.execute(_READ[bool(domain)], args).fetchall()
        return [Event(self._token(seq), seq, at, Change(ChangeKind(kind), *rest))
                for seq, at, kind, *rest in rows]

    async def watch(self, since: str, domain: str = "") -> AsyncIterator[Event]:
        """Every event after `since` (one domain's, or all), then each new one as it comes; never ends."""
        after = self._position(since)
        waker = asyncio.Event()
        self._wakers.add(waker)
        try:
            while True:
                # Cleared before the read: an append after it wakes the next wait.
                waker.clear()
                events = self._read(after, domain)
                for event in events:
                    yield event
                    after = event.seq
                if len(events) < _BATCH:
                    await waker.wait()
        finally:
            self._wakers.discard(waker)
