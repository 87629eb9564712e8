"""Opening a SQLite file the way every store here wants it: shared by threads (callers hold
their own lock), autocommit (callers open their transactions), WAL so readers never wait for
the writer.

Switching a new file to WAL needs the file to itself, and SQLite does not wait for that (the
busy timeout does not cover it): processes opening a new database together (the milter and
`mailward reports build`, the STS service and `mailward sts query`) retry for up to the
timeout.
"""

from __future__ import annotations

import sqlite3
import time


def connect(path: str, *, timeout: float = 10) -> sqlite3.Connection:
    """A connection to `path` in WAL mode; sqlite3.Error when that cannot be had."""
    db = sqlite3.connect(path, timeout=timeout, check_same_thread=False, isolation_level=None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.02)
    db.execute("PRAGMA synchronous=NORMAL")
    return db
