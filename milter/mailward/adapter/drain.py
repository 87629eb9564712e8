"""Graceful stop: let open transactions finish, refuse new ones, then stop libmilter.

libmilter's own stop (`smfi_stop`, or its signal thread on SIGTERM) stops serving every
connection at once: a message between MAIL FROM and end of data is dropped and Postfix
tempfails it. So mailward takes the stop signal itself (app.py), marks the gate closed, waits
until the transactions already open have ended or the grace period has passed, and only then
asks libmilter to stop. A transaction opens when MAIL FROM is accepted and ends at end of
message, abort (RSET) or close.
"""

from __future__ import annotations

import threading
import time


class Drain:
    """Counts open transactions; once `close()`d, `admit()` refuses new ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = 0
        self._closed = False

    @property
    def open(self) -> int:
        with self._cond:
            return self._open

    @property
    def closed(self) -> bool:
        return self._closed

    def admit(self) -> bool:
        """Open a transaction, unless we are stopping."""
        with self._cond:
            if self._closed:
                return False
            self._open += 1
            return True

    def done(self) -> None:
        """A transaction `admit()` opened has ended."""
        with self._cond:
            self._open -= 1
            if self._open <= 0:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def wait(self, grace: float) -> int:
        """Wait up to `grace` seconds for the open transactions to end; return how many are
        still open."""
        deadline = time.monotonic() + grace
        with self._cond:
            while self._open > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._open
