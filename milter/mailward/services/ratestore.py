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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailward.errors import MailwardError


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


class MemoryStore(_Observed):
    """Counters in this process (the default: nothing to set up, not shared)."""

    spec = StoreSpec()

    def __init__(self, *, metrics: Any = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(metrics)
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[float, int]] = {}  # key → (expires, count)

    def add(self, keys: Sequence[str], amount: int, window: int) -> list[int]:
        now = self._clock()
        out = []
        with self._lock:
            if len(self._counts) > 100_000:  # drop finished windows now and then
                self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            for key in keys:
                name = _key(key, window, now)
                expires, count = self._counts.get(name, ((now // window + 1) * window, 0))
                self._counts[name] = (expires, count + amount)
                out.append(count + amount)
        return out


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
