"""Where fetched MTA-STS policies are kept (RFC 8461 §5.1): SQLite on this host by default,
Redis for a fleet of MTAs that share one cache. Both survive a restart.

An entry is one domain's last good policy, its `id`, when it was fetched, when it expires
(`max_age` after the fetch) and when the service last checked it. A store that fails raises
`CacheError`; the service answers TEMP then, never "no policy": a broken cache must not
downgrade mail to a domain that asked for TLS.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from mailward.core.settings import StsCache, StsSettings
from mailward.errors import MailwardError
from mailward.services import sqlitedb
from mailward.sts.policy import Mode, Policy, PolicyError, valid_pattern

REDIS_PREFIX = "mailward:sts:"


class CacheError(MailwardError):
    """The cache could not be read or written."""


@dataclass(frozen=True, slots=True)
class Entry:
    domain: str
    policy_id: str
    policy: Policy
    fetched: float  # epoch seconds
    expires: float
    checked: float  # the last refresh attempt (TXT id compared, maybe refetched)
    dane: bool = False  # every MX host had DNSSEC-validated TLSA records at the last look
    error: str = ""  # why the last refresh failed; the policy stays until it expires

    def to_json(self) -> str:
        data = asdict(self)
        data["policy"] = {"mode": str(self.policy.mode), "max_age": self.policy.max_age,
                          "mx": list(self.policy.mx)}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        """An entry as stored; anything else (a cache written by someone else, a disk
        error) is a CacheError."""
        try:
            data = json.loads(text)
            p = data.pop("policy")
            mx = tuple(str(m) for m in p["mx"])
            if not all(valid_pattern(m) for m in mx):
                raise PolicyError("mx")
            policy = Policy(Mode(p["mode"]), int(p["max_age"]), mx)
            return cls(domain=str(data["domain"]), policy_id=str(data["policy_id"]),
                       policy=policy, fetched=float(data["fetched"]),
                       expires=float(data["expires"]), checked=float(data["checked"]),
                       dane=bool(data.get("dane", False)), error=str(data.get("error", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CacheError(f"unreadable cache entry: {type(exc).__name__}") from None

    def checked_now(self, now: float, error: str = "") -> Entry:
        return replace(self, checked=now, error=error)


class Cache(Protocol):
    def get(self, domain: str) -> Entry | None: ...

    def put(self, entry: Entry) -> None: ...

    def delete(self, domain: str) -> bool: ...

    def entries(self) -> list[Entry]: ...

    def purge(self) -> int: ...

    def drop_expired(self, now: float) -> int: ...


class SqliteCache:
    """One table in a SQLite file (WAL), shared by the service's threads and the `query` and
    `purge` commands."""

    def __init__(self, path: str) -> None:
        try:
            self._db = sqlitedb.connect(path, timeout=5)
            self._db.execute("CREATE TABLE IF NOT EXISTS sts_policy (domain TEXT PRIMARY KEY, "
                             "expires REAL NOT NULL, entry TEXT NOT NULL)")
        except sqlite3.Error as exc:
            raise CacheError(f"{path}: {exc}") from None
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                cursor = self._db.execute(sql, args)
                return cursor.fetchall() if cursor.description else [cursor.rowcount]
        except sqlite3.Error as exc:
            raise CacheError(f"sqlite: {exc}") from None

    def get(self, domain: str) -> Entry | None:
        rows = self._run("SELECT entry FROM sts_policy WHERE domain = ?", (domain,))
        return Entry.from_json(rows[0][0]) if rows else None

    def put(self, entry: Entry) -> None:
        self._run("INSERT OR REPLACE INTO sts_policy (domain, expires, entry) VALUES (?, ?, ?)",
                  (entry.domain, entry.expires, entry.to_json()))

    def delete(self, domain: str) -> bool:
        return bool(self._run("DELETE FROM sts_policy WHERE domain = ?", (domain,))[0])

    def entries(self) -> list[Entry]:
        return [Entry.from_json(row[0])
                for row in self._run("SELECT entry FROM sts_policy ORDER BY domain")]

    def purge(self) -> int:
        return int(self._run("DELETE FROM sts_policy")[0])

    def drop_expired(self, now: float) -> int:
        return int(self._run("DELETE FROM sts_policy WHERE expires <= ?", (now,))[0])


class RedisCache:
    """One key per domain (`mailward:sts:DOMAIN`), expiring with the policy."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        import redis  # noqa: PLC0415 - the optional extra mailward[redis], loaded if used

        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._client, name)(*args)
        except self._errors as exc:
            raise CacheError(f"redis: {type(exc).__name__}: {exc}") from None

    def get(self, domain: str) -> Entry | None:
        raw = self._call("get", REDIS_PREFIX + domain)
        return Entry.from_json(raw) if raw is not None else None

    def put(self, entry: Entry) -> None:
        # kept a day past expiry, so that `query` can still say what was there
        ttl = max(1, int(entry.expires - entry.checked) + 86400)
        self._call("set", REDIS_PREFIX + entry.domain, entry.to_json(), ttl)

    def delete(self, domain: str) -> bool:
        return bool(self._call("delete", REDIS_PREFIX + domain))

    def _keys(self) -> list[bytes]:
        try:
            return list(self._client.scan_iter(match=REDIS_PREFIX + "*", count=1000))
        except self._errors as exc:
            raise CacheError(f"redis: {type(exc).__name__}: {exc}") from None

    def entries(self) -> list[Entry]:
        keys = sorted(self._keys())
        values = self._call("mget", keys) if keys else []
        return [Entry.from_json(v) for v in values if v is not None]

    def purge(self) -> int:
        keys = self._keys()
        return int(self._call("delete", *keys)) if keys else 0

    def drop_expired(self, now: float) -> int:
        gone = [e.domain for e in self.entries() if e.expires <= now]
        return sum(self.delete(d) for d in gone)


def open_cache(settings: StsSettings) -> Cache:
    if settings.cache is StsCache.REDIS:
        return RedisCache(settings.redis_url, timeout=min(2.0, settings.fetch_timeout))
    return SqliteCache(settings.cache_path)
