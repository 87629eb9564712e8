"""Rate-limit stores: fixed-window counters in-process, or in Redis for a fleet of MTAs.

`add(keys, amount, window)` atomically adds `amount` to each key's counter for the current
window and returns the new totals. In Redis one Lua script does all keys of an event in one
round trip (INCRBY, and EXPIRE when a counter is new), so concurrent milters on several hosts
share exact counts. Keys are hashed: no address or login is stored in Redis in clear text.
When Redis cannot be reached, `StoreUnavailable` is raised and the check applies the
configured fail-open/fail-closed choice.

A store is described by a `StoreSpec`; on reload the running store is kept while the spec is
unchanged (core/snapshot.py), so no sender's window starts afresh.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailward.errors import MailwardError

log = logging.getLogger(__name__)


class StoreUnavailable(MailwardError):
    """The counter store could not be reached in time."""


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Which store: `memory` (this process) or `redis` at `redis_url`, bounded by `timeout`."""

    backend: str = "memory"
    redis_url: str = ""
    timeout: float = 0.5


class RateStore(Protocol):
    spec: StoreSpec

    def add(self, keys: Sequence[str], amount: int, window: int) -> list[int]: ...

    def hit(self, *, direction: str, kind: str, measure: str) -> None: ...


class _Observed:
    """Counts limit hits (by kind, never by value) and store errors in the metrics."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics

    def hit(self, *, direction: str, kind: str, measure: str) -> None:
        if self._metrics is not None:
            self._metrics.ratelimit_hits.labels(direction=direction, kind=kind,
                                                measure=measure).inc()

    def _error(self) -> None:
        if self._metrics is not None:
            self._metrics.ratelimit_backend_errors.inc()


def _key(key: str, window: int, now: float) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"mailward:rl:{digest}:{window}:{int(now // window)}"


MAX_MEMORY_KEYS = 1_000_000  # about 90 MiB of counters when full (16-byte digests)


class MemoryStore(_Observed):
    """Counters in this process (the default: nothing to set up, not shared).

    Keys come from what senders choose (domains, logins), so both time and memory are
    bounded. Counters live in one bucket per fixed window (window length, window number),
    keyed by a 16-byte digest of the key, so a long login costs no more than a short one. A
    bucket is dropped whole when its window ends (found through a heap of end times): each
    `add` costs O(1) amortised, whatever the number of live keys.

    At most `max_keys` counters are kept. When a new key would pass that, the oldest other
    buckets go first (windows of another length, left over from a reload); if only the
    current window is left, the new key is not stored: its count is this event alone (fail
    open for keys first seen while full; keys already counted keep counting exactly). Each
    such key is counted in `mailward_ratelimit_backend_errors_total` and `untracked`, and
    the first one of each window is logged. The window's end empties the store again.
    """

    spec = StoreSpec()

    def __init__(self, *, metrics: Any = None, clock: Callable[[], float] = time.time,
                 max_keys: int = MAX_MEMORY_KEYS) -> None:
        super().__init__(metrics)
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # (window, number) → digest → count, oldest bucket first (dicts keep insertion order)
        self._buckets: dict[tuple[int, int], dict[bytes, int]] = {}
        self._ends: list[tuple[float, int, int]] = []  # heap of (end, window, number)
        self._size = 0  # counters in all buckets
        self._full_logged: tuple[int, int] | None = None
        self.untracked = 0  # keys not stored because the store was full

    @property
    def size(self) -> int:
        """The number of counters held."""
        return self._size

    def add(self, keys: Sequence[str], amount: int, window: int) -> list[int]:
        now = self._clock()
        number = int(now // window)
        current = (window, number)
        digests = [hashlib.sha256(k.encode("utf-8", "surrogateescape")).digest()[:16]
                   for k in keys]
        dropped = []  # freed after the lock is released
        out = []
        with self._lock:
            while self._ends and self._ends[0][0] <= now:
                _, w, n = heapq.heappop(self._ends)
                dropped.append(self._drop((w, n)))
            bucket = self._buckets.get(current)
            if bucket is None:
                bucket = self._buckets[current] = {}
                heapq.heappush(self._ends, ((number + 1) * window, window, number))
            for digest in digests:
                count = bucket.get(digest)
                if count is None and self._size >= self._max_keys:
                    dropped += self._make_room(current)
                    if self._size >= self._max_keys:
                        self._refuse(current)
                        out.append(amount)
                        continue
                if count is None:
                    self._size += 1
                    count = 0
                bucket[digest] = count + amount
                out.append(count + amount)
        del dropped
        return out

    def _drop(self, bucket: tuple[int, int]) -> dict[bytes, int]:
        counters = self._buckets.pop(bucket, {})  # {} when already evicted
        self._size -= len(counters)
        return counters

    def _make_room(self, keep: tuple[int, int]) -> list[dict[bytes, int]]:
        """Evict whole buckets other than `keep`, oldest first, until a counter fits."""
        dropped = []
        for bucket in [b for b in self._buckets if b != keep]:
            if self._size < self._max_keys:
                break
            dropped.append(self._drop(bucket))  # its heap entry finds nothing later
        return dropped

    def _refuse(self, bucket: tuple[int, int]) -> None:
        self.untracked += 1
        self._error()
        if self._full_logged != bucket:
            self._full_logged = bucket
            log.warning("rate-limit store full (%d counters): keys first seen in this "
                        "%d-second window are not counted until it ends", self._size,
                        bucket[0])


# KEYS: counter names; ARGV[1]: amount; ARGV[2]: seconds to keep a new counter
_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('INCRBY', key, ARGV[1])
  if v == tonumber(ARGV[1]) then redis.call('EXPIRE', key, ARGV[2]) end
  out[i] = v
end
return out
"""


class RedisStore(_Observed):
    """Counters shared through Redis (`redis_url`), bounded by `timeout` seconds."""

    def __init__(self, url: str, *, timeout: float, metrics: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        import redis  # noqa: PLC0415 - the optional extra mailward[redis], loaded if used

        super().__init__(metrics)
        self.spec = StoreSpec("redis", url, timeout)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
        self._script: Any = self._client.register_script(_SCRIPT)
        self._clock = clock

    def add(self, keys: Sequence[str], amount: int, window: int) -> list[int]:
        now = self._clock()
        names = [_key(k, window, now) for k in keys]
        try:
            return [int(v) for v in self._script(keys=names, args=[amount, window + 60])]
        except self._errors as exc:
            self._error()
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None


def open_store(spec: StoreSpec, *, metrics: Any = None) -> RateStore:
    """The store `spec` describes."""
    if spec.backend == "redis":
        return RedisStore(spec.redis_url, timeout=spec.timeout, metrics=metrics)
    return MemoryStore(metrics=metrics)
