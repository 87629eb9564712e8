"""ratelimit: is this sender over its message or recipient rate?

Counted in fixed windows of `window` seconds, per key kind: the authenticated user (which
Postfix's anvil cannot express), the sender domain (MAIL FROM) and the client network (IPv4
by `ipv4_prefix`, IPv6 by `ipv6_prefix`, default /64, where anvil counts single addresses).
Limits are set per direction (inbound, or outbound for our own users and networks), kind and
measure, e.g. `outbound user recipients 2000`; a limit not set is no limit.

Messages are counted at MAIL FROM, recipients at each RCPT TO; over the limit → `450 4.7.1`
at that stage (the sender retries later). Counters live in this process (`backend = memory`)
or in Redis (`backend = redis`, shared by every mailward using the same `redis_url`). When
Redis cannot be reached, `on_backend_error` decides: accept (fail open) or tempfail.

Results: pass (counted, under every limit), fail (over one), temperror (no counter store),
none (no limit applies).
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.ini import Section
from mailward.core.transaction import Direction, IPAddress, Stage, Transaction, domain_of
from mailward.core.verdict import Action, CheckResult, Reply, Result
from mailward.services.ratestore import StoreSpec, StoreUnavailable

NAME = "ratelimit"
KINDS = ("user", "domain", "network")
MEASURES = ("messages", "recipients")


@dataclass(frozen=True)
class Settings:
    """[check.ratelimit]"""

    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 0.5
    on_backend_error: str = "accept"
    window: int = 3600
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    limits: tuple[str, ...] = ()  # "direction kind measure number"
    reply: Reply = Reply(450, "4.7.1", "Rate limit exceeded, try again later")

    @classmethod
    def load(cls, sec: Section) -> Settings:
        limits = []
        for line in (ln.strip() for ln in sec.string("limits", "").replace(",", "\n")
                     .splitlines()):
            if not line:
                continue
            words = line.lower().split()
            if (len(words) != 4 or words[0] not in ("inbound", "outbound")
                    or words[1] not in KINDS or words[2] not in MEASURES
                    or not words[3].isdigit() or int(words[3]) < 1):
                raise sec.error("limits", "lines of 'inbound|outbound user|domain|network "
                                "messages|recipients NUMBER'", line)
            limits.append(" ".join(words))
        backend = sec.option("backend", cls.backend, ("memory", "redis"))
        if backend == "redis":
            if importlib.util.find_spec("redis") is None:
                raise sec.error("backend", "memory, or redis with the redis package installed "
                                "(pip install 'mailward[redis]')", backend)
        return cls(
            backend=backend,
            redis_url=sec.parse("redis_url", cls.redis_url, "a redis:// or unix:// URL",
                                _redis_url),
            timeout=sec.seconds("timeout", cls.timeout, maximum=10),
            on_backend_error=sec.option("on_backend_error", cls.on_backend_error,
                                        ("accept", "tempfail")),
            window=sec.integer("window", cls.window, minimum=1, maximum=7 * 86400),
            ipv4_prefix=sec.integer("ipv4_prefix", cls.ipv4_prefix, minimum=8, maximum=32),
            ipv6_prefix=sec.integer("ipv6_prefix", cls.ipv6_prefix, minimum=16, maximum=128),
            limits=tuple(limits),
            reply=sec.reply("reply", str(cls.reply), temporary=True),
        )

    @functools.cached_property
    def table(self) -> dict[tuple[str, str, str], int]:
        """The limits as a lookup, built once per loaded config."""
        out: dict[tuple[str, str, str], int] = {}
        for line in self.limits:
            d, k, m, n = line.split()
            out[(d, k, m)] = int(n)
        return out

    def limit(self, direction: str, kind: str, measure: str) -> int:
        return self.table.get((direction, kind, measure), 0)


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def _network(tx: Transaction, settings: Settings) -> str:
    if tx.client_ip is None:
        return ""
    ip = getattr(tx.client_ip, "ipv4_mapped", None) or tx.client_ip
    return _prefix(ip, settings.ipv4_prefix if ip.version == 4 else settings.ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _prefix(ip: IPAddress, prefix: int) -> str:
    """The client's network, e.g. 192.0.2.0/24 (the same clients come back: cached)."""
    return str(ipaddress.ip_network((ip, prefix), strict=False))


_VALUES: dict[str, Callable[[Transaction, Settings], str]] = {
    "user": lambda tx, _: tx.auth_user.lower(),
    "domain": lambda tx, _: domain_of(tx.mail_from),
    "network": _network,
}


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Count this message (MAIL) or recipient (RCPT) and judge it."""
    direction = "inbound" if tx.direction is Direction.INBOUND else "outbound"
    measure = "messages" if tx.stage is Stage.MAIL else "recipients"
    keys = [(kind, value, limit) for kind, value_of in _VALUES.items()
            if (limit := settings.limit(direction, kind, measure))
            and (value := value_of(tx, settings))]
    if not keys:
        return CheckResult(NAME, Result.NONE)
    names = [f"{direction}:{kind}:{measure}:{value}" for kind, value, _ in keys]
    try:
        counts = ctx.rates.add(names, 1, settings.window)
    except StoreUnavailable as exc:
        closed = settings.on_backend_error == "tempfail"
        return CheckResult(NAME, Result.TEMPERROR,
                           action=Action.TEMPFAIL if closed else Action.ACCEPT,
                           reply=settings.reply,
                           reason=f"{exc} ({'fail closed' if closed else 'fail open'})")
    over = [(kind, count, limit) for (kind, _, limit), count in zip(keys, counts, strict=True)
            if count > limit]
    if over:
        kind, count, limit = over[0]
        ctx.rates.hit(direction=direction, kind=kind, measure=measure)
        return CheckResult(NAME, Result.FAIL, action=Action.TEMPFAIL, reply=settings.reply,
                           reason=f"{direction} {kind} {measure}: {count} > {limit} per "
                                  f"{settings.window}s")
    return CheckResult(NAME, Result.PASS)


class RateLimit(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.MAIL, Stage.RCPT})
    uses = frozenset({Service.RATES})

    def rate_store(self, settings: Settings) -> StoreSpec:
        if settings.backend == "redis":
            return StoreSpec("redis", settings.redis_url, settings.timeout)
        return StoreSpec()


CHECK = RateLimit(Settings.load, check)
