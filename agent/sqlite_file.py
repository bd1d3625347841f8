"""One SQLite file in the state directory, of a known schema, or made anew.

The agent's SQLite files (the catalogue's index, the change feed, the request
ids) are opened in WAL mode with synchronous=NORMAL: a committed transaction
survives the agent's `kill -9` (it is in the WAL, in the page cache), only a
power cut may lose the last ones. A file that is missing, unreadable, corrupt
or of another schema version is replaced by an empty one; each user says
what that costs (the index is rebuilt, the feed starts a new epoch).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def open_db(path: Path, schema: str, version: int, *, what: str, if_unusable: str) -> tuple[sqlite3.Connection, bool]:
    """The database at `path` and whether it was made anew (from `schema`, at `version`)."""
    existed = path.exists()
    db: sqlite3.Connection | None = None
    try:
        db = _connect(path)
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found == version:
            if (check := db.execute("PRAGMA quick_check").fetchone()[0]) == "ok":
                return db, False
            problem = f"integrity check: {check}"
        else:
            problem = f"schema version {found}, this agent writes {version}"
    except sqlite3.DatabaseError as err:
        problem = str(err)
    if db is not None:
        db.close()
    if existed:
        log.warning("%s %s is unusable (%s); %s", what, path, problem, if_unusable)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    db = _connect(path)
    db.executescript(f"BEGIN; {schema} PRAGMA user_version = {version}; COMMIT;")
    return db, True
