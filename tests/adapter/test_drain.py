"""The graceful-stop gate on its own: counting, closing, waiting with a deadline."""

from __future__ import annotations

import threading
import time

from mailward.adapter.drain import Drain


def test_closed_gate_refuses_new_transactions_and_keeps_the_open_ones() -> None:
    drain = Drain()
    assert drain.admit() and drain.admit()
    drain.close()
    assert drain.closed and not drain.admit()
    assert drain.open == 2
    drain.done()
    drain.done()
    assert drain.open == 0


def test_wait_returns_when_the_last_transaction_ends() -> None:
    drain = Drain()
    assert drain.admit()
    drain.close()
    threading.Timer(0.2, drain.done).start()
    started = time.monotonic()
    assert drain.wait(30) == 0
    assert time.monotonic() - started < 10  # woken by done(), not by the 30 s deadline


def test_wait_gives_up_after_the_grace_period() -> None:
    drain = Drain()
    assert drain.admit()
    started = time.monotonic()
    assert drain.wait(0.3) == 1
    assert time.monotonic() - started >= 0.3
