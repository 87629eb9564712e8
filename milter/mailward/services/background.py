"""A bounded queue and the one daemon thread that empties it: how the milter hands work it
must never wait for (report rows, report mail) to the background.

`offer` never blocks: it says whether the item was taken, and the caller counts what was not.
`close` queues a stop mark behind what is waiting and waits for the thread to get to it.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueThread(Generic[T]):
    def __init__(self, name: str, maxsize: int) -> None:
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _start(self) -> None:
        """Subclasses call this at the end of their own __init__."""
        self._thread.start()

    def offer(self, item: T) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 10) -> None:
        """Finish what is queued, then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
