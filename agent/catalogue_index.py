"""The catalogue's index: one SQLite file in the state directory with a row
per registered snapshot, so that a listing of thousands of snapshots is one
query instead of thousands of manifest reads.

Derived data only: the manifests are the truth, and the catalogue's pointer
files say which snapshots exist. Each row remembers the version of the
manifest it was made from (its mtime, size and inode); on start the catalogue
checks every row against them and redoes the rows that are missing, stale or
orphaned, and a file that is missing, unreadable or of another schema is
rebuilt from scratch. So the index needs no fsync of its own (WAL,
synchronous=NORMAL): a crash can lose its last rows, never the truth, and the
next start puts them back.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import paging
from .errors import InvalidArgument
from .sqlite_file import open_db

log = logging.getLogger(__name__)

FILE = "catalogue.sqlite"
# 2: listings carry uids, resource names and Durations; 3: a snapshot's group and pause times; 4: its uid,
# looked up by requests that name a snapshot so.
SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE snapshots (
    domain TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    stamp TEXT NOT NULL,
    listing BLOB NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (domain, name)
);
CREATE INDEX listing_order ON snapshots (domain, created_at, name);
CREATE INDEX by_uid ON snapshots (uid);
"""
# A page's query by (one domain?, after a key?).
_PAGE = {
    (False, False): "SELECT domain, created_at, name, listing FROM snapshots "
                    "ORDER BY domain, created_at, name LIMIT ?",
    (True, False): "SELECT domain, created_at, name, listing FROM snapshots WHERE domain = ? "
                   "ORDER BY domain, created_at, name LIMIT ?",
    (False, True): "SELECT domain, created_at, name, listing FROM snapshots "
                   "WHERE (domain, created_at, name) > (?, ?, ?) ORDER BY domain, created_at, name LIMIT ?",
    (True, True): "SELECT domain, created_at, name, listing FROM snapshots "
                  "WHERE domain = ? AND (created_at, name) > (?, ?) "
                  "ORDER BY domain, created_at, name LIMIT ?",
}


@dataclass(frozen=True)
class Key:
    """A snapshot's place in the listing order (domain, creation time, name)."""

    domain: str
    created_at: float
    name: str


@dataclass(frozen=True)
class Row:
    domain: str
    name: str
    path: str
    created_at: float
    # The manifest version the row was made from (see manifest_stamp).
    stamp: str
    # The snapshot as the API lists it, serialized; opaque here.
    listing: bytes
    uid: str


class Listing(NamedTuple):
    """A row as a page lists it (a tuple: pages of thousands are built per call)."""

    domain: str
    created_at: float
    name: str
    listing: bytes

    @property
    def key(self) -> Key:
        return Key(self.domain, self.created_at, self.name)


def encode_token(domain_filter: str, after: Key) -> str:
    """An opaque page token (AIP-158) that also names the filter it belongs to."""
    return paging.encode(domain_filter, [after.domain, after.created_at, after.name])


def decode_token(token: str, domain_filter: str) -> Key:
    domain, created_at, name = paging.decode(token, domain_filter, 3)
    try:
        return Key(str(domain), float(created_at), str(name))
    except (ValueError, TypeError) as err:
        raise InvalidArgument("page_token is not one this agent gave out", reason="INVALID_PAGE_TOKEN",
                              field="page_token") from err


class CatalogueIndex:
    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / FILE
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        # One connection, used from the event loop (pages) and from the
        # threads that operations write through: one user at a time.
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        db, _ = open_db(self._path, _SCHEMA, SCHEMA_VERSION, what="catalogue index",
                        if_unusable="rebuilding it from the manifests")
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def stamps(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Every row's (domain, name) -> (path, manifest stamp)."""
        with self._lock:
            rows = self._db.execute("SELECT domain, name, path, stamp FROM snapshots").fetchall()
        return {(d, n): (p, s) for d, n, p, s in rows}

    def update(self, put: Iterable[Row] = (), remove: Iterable[tuple[str, str]] = ()) -> None:
        """Rows in and out, in one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM snapshots WHERE domain = ? AND name = ?", remove)
            self._db.executemany(
                "INSERT OR REPLACE INTO snapshots (domain, name, path, created_at, stamp, listing, uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((r.domain, r.name, r.path, r.created_at, r.stamp, r.listing, r.uid) for r in put))

    def path_of_uid(self, uid: str) -> str | None:
        """The directory of the registered snapshot with this uid."""
        with self._lock:
            found = self._db.execute("SELECT path FROM snapshots WHERE uid = ?", (uid,)).fetchone()
        return str(found[0]) if found else None

    def page(self, domain: str, after: Key | None, limit: int, max_bytes: int) -> tuple[list[Listing], bool]:
        """Up to `limit` rows in listing order after `after` (one domain's, or
        all with domain ""), fewer when `max_bytes` of listings are reached
        first; and whether more rows follow."""
        args: list[str | float] = [domain] if domain else []
        if after is not None:
            args += [after.created_at, after.name] if domain else [after.domain, after.created_at, after.name]
        with self._lock:
            found = self._db.execute(_PAGE[bool(domain), after is not None], (*args, limit + 1)).fetchall()
        rows: list[Listing] = []
        size = 0
        for values in found:
            row = Listing._make(values)
            if len(rows) == limit or (rows and size + len(row.listing) > max_bytes):
                return rows, True
            rows.append(row)
            size += len(row.listing)
        return rows, False
