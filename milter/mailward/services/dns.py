"""The one DNS layer: a dnspython resolver, a TTL-respecting cache, adapters for pyspf/dkimpy.

Every SPF, DKIM and DMARC lookup goes through `Resolver.query`, so each is bounded (per-try
`timeout`, per-lookup `lifetime`), cached (positive answers for their TTL, NXDOMAIN and NODATA
for the SOA minimum, RFC 2308 §5, both capped by `max_ttl`), counted
(`mailward_dns_queries_total{rtype,outcome}`) and timed (`mailward_dns_duration_seconds`).
A timeout or SERVFAIL raises `DnsTimeout` / `DnsServFail` (checks map them to `temperror`,
never to `fail` or `none`); these are not cached, so the next message asks again.

Checks get a `BoundResolver`: the one shared resolver plus the message's `Budget`, the DNS time
all lookups of one message may take together (`[dns] budget`); when it runs out, lookups raise
`DnsTimeout` at once and the check reports temperror.

A `Gate` lets a caller that must not wait (the asyncio engine's event loop thread) run checks
on cached answers only: with `gate.inline` set, a lookup the cache cannot answer marks the gate
`refused` and raises `WouldWait` instead of asking. `WouldWait` is a BaseException, because
checks (and pyspf) contain every Exception; pyspf's bare `except:` can even swallow it, which
is why the mark on the gate, not the exception, is what the pipeline reads.

A `Memo` keeps results computed from DNS answers alone (the SPF result of an IP, sender and
HELO name, a parsed DMARC record) for as long as every answer they read is still cached:
inside `Memo.tracing()`, each lookup notes when its answer expires, and a lookup that fails,
is refused or reads data that must not be reused (`spoil()`) makes the result one not to
keep. Results built on kept results expire with them (traces nest).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import ipaddress
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf

from mailward.core.ini import Section
from mailward.errors import MailwardError


class DnsError(MailwardError):
    """A lookup could not be answered; the result is temporary (temperror)."""


class DnsTimeout(DnsError, TimeoutError):
    """No answer within the configured lifetime."""


class DnsServFail(DnsError):
    """The servers answered SERVFAIL/REFUSED, or an unusable response."""


class WouldWait(BaseException):
    """A lookup the cache cannot answer, asked through an inline `Gate`."""


@dataclass(slots=True)
class Gate:
    """Whether lookups may wait (`inline` False) and whether one was refused for it."""

    inline: bool = False
    refused: bool = False


@dataclass(slots=True)
class Trace:
    """What one computation read from DNS: when the first of its answers expires, and
    whether it may be kept at all."""

    expires: float = math.inf
    spoiled: bool = False


_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("dns_trace", default=None)
T = TypeVar("T")


def _note(expires: float) -> None:
    trace = _TRACE.get()
    if trace is not None and expires < trace.expires:
        trace.expires = expires


def spoil() -> None:
    """Mark what the current `Memo.tracing()` block computes as not to be kept."""
    trace = _TRACE.get()
    if trace is not None:
        trace.spoiled = True


class Memo:
    """Results computed from DNS answers alone, each kept until the first answer it read
    expires (at most `max_ttl`), at most `size` of them, least recently used first out."""

    def __init__(self, size: int, max_ttl: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._max_ttl = max_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[Any, tuple[float, Any]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        """The value kept for `key`, or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
        _note(hit[0])  # a computation that uses this result read its answers too
        return hit[1]

    @contextlib.contextmanager
    def tracing(self) -> Iterator[Trace]:
        """Note, in the `Trace` yielded, what the lookups of this block read (and in the
        trace of an enclosing block as well)."""
        trace = Trace()
        token = _TRACE.set(trace)
        try:
            yield trace
        finally:
            _TRACE.reset(token)
            _note(trace.expires)
            if trace.spoiled:
                spoil()

    def compute(self, key: Any, make: Callable[[], T], keep: Callable[[T], bool]) -> T:
        """The value kept for `key`, or `make()`'s, made in a tracing block and kept if
        `keep` says it may be and the trace allows."""
        hit = self.get(key)
        if hit is not None:
            return cast(T, hit[0])
        with self.tracing() as trace:
            value = make()
        if keep(value):
            self.put(key, (value,), trace)
        return value

    def put(self, key: Any, value: Any, trace: Trace) -> bool:
        """Keep `value`, computed in `trace`'s block, unless the trace says not to."""
        now = self._clock()
        expires = min(trace.expires, now + self._max_ttl)
        if trace.spoiled or expires <= now or self._size <= 0:
            return False
        with self._lock:
            self._items[key] = (expires, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return True


def parse_nameserver(word: str) -> tuple[str, int]:
    """`192.0.2.1`, `192.0.2.1:5353`, `2001:db8::1` or `[2001:db8::1]:5353`."""
    if word.startswith("["):
        host, _, port = word[1:].partition("]")
        port = port.removeprefix(":") or "53"
    elif word.count(":") == 1:
        host, port = word.split(":")
    else:
        host, port = word, "53"
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(word)
    return host, int(port)


@dataclass(frozen=True)
class DnsSettings:
    """[dns]: the one resolver every check uses."""

    nameservers: tuple[tuple[str, int], ...] = ()  # empty: those of /etc/resolv.conf
    timeout: float = 2.0  # per try
    lifetime: float = 5.0  # per lookup, retries included
    cache_size: int = 10000
    max_ttl: int = 86400
    negative_ttl: int = 300  # NXDOMAIN/NODATA without an SOA to say otherwise
    # All lookups of one message together (SPF, DKIM keys, the DMARC walk): kept well inside
    # Postfix's milter_command_timeout (30 s) and milter_content_timeout (300 s).
    budget: float = 20.0

    @classmethod
    def load(cls, sec: Section) -> DnsSettings:
        servers = []
        for word in sec.words("nameservers", ()):
            try:
                servers.append(parse_nameserver(word))
            except ValueError:
                raise sec.error("nameservers", "IP addresses, each with an optional :PORT "
                                "([v6]:PORT)", word) from None
        timeout = sec.seconds("timeout", cls.timeout, maximum=60)
        lifetime = sec.seconds("lifetime", cls.lifetime, maximum=300)
        if lifetime < timeout:
            raise sec.error("lifetime", f"at least timeout ({timeout:g})", str(lifetime))
        budget = sec.seconds("budget", cls.budget, maximum=280)
        if budget < lifetime:
            raise sec.error("budget", f"at least lifetime ({lifetime:g})", str(budget))
        return cls(
            nameservers=tuple(servers), timeout=timeout, lifetime=lifetime, budget=budget,
            cache_size=sec.integer("cache_size", cls.cache_size, maximum=10_000_000),
            max_ttl=sec.integer("max_ttl", cls.max_ttl, minimum=1, maximum=7 * 86400),
            negative_ttl=sec.integer("negative_ttl", cls.negative_ttl, maximum=86400),
        )


Rdata = Any  # dnspython rdata objects (TXT: .strings, A/AAAA: .address, MX: .exchange, …)


class Resolver:
    """Thread-safe caching resolver shared by every check."""

    def __init__(self, settings: DnsSettings, *, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, int], tuple[float, tuple[Rdata, ...]]]
        self._cache = collections.OrderedDict()
        if settings.nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                             for ip, port in settings.nameservers]
        else:
            r = dns.resolver.Resolver(configure=True)
        r.timeout = settings.timeout
        r.lifetime = settings.lifetime
        r.cache = None  # ours, below, is the one cache
        self._resolver = r
        self.memo = Memo(settings.cache_size, settings.max_ttl, clock)

    # -- the one entry point --------------------------------------------------------------

    def query(self, name: str, rtype: str, *, budget: Budget | None = None,
              gate: Gate | None = None) -> tuple[Rdata, ...]:
        """The records of `rtype` at `name`; `()` for NXDOMAIN or no such records.

        With a `budget`, the lookup may take no longer than what is left of it (and is
        charged for its time); an exhausted budget raises `DnsTimeout` without asking. With
        an inline `gate`, a lookup that would have to ask raises `WouldWait` (see above).
        """
        key = (name.lower().rstrip("."), dns.rdatatype.from_text(rtype))
        if not valid_name(key[0]):
            # no record can exist at a name DNS cannot carry: the answer is "none", never a
            # temporary failure a sender could provoke (RFC 7208 §4.3, RFC 6376 §6.1.2)
            self._count(rtype, "badname", 0.0)
            return ()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                self._count(rtype, "cached", 0.0)
                _note(hit[0])
                return hit[1]
        try:
            return self._ask(key, name, rtype, now, budget=budget, gate=gate)
        except BaseException:
            spoil()
            raise

    def _ask(self, key: tuple[str, dns.rdatatype.RdataType], name: str, rtype: str, now: float, *,
             budget: Budget | None, gate: Gate | None) -> tuple[Rdata, ...]:
        """`query` for an answer the cache does not hold."""
        if gate is not None and gate.inline:
            gate.refused = True
            raise WouldWait(f"{name} {rtype}")
        lifetime = self.settings.lifetime
        if budget is not None:
            lifetime = min(lifetime, budget.remaining())
            if lifetime <= 0:
                self._count(rtype, "budget", 0.0)
                raise DnsTimeout(f"DNS time budget of {budget.total:g}s for this message "
                                 f"used up before {name} {rtype}")
        start = time.perf_counter()
        try:
            answer = self._resolver.resolve(key[0] + ".", key[1], search=False,
                                            raise_on_no_answer=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            self._store(key, (), self._negative_ttl(responses.values()), now)
            self._count(rtype, "nxdomain", time.perf_counter() - start)
            return ()
        except dns.exception.Timeout:
            self._count(rtype, "timeout", time.perf_counter() - start)
            raise DnsTimeout(f"DNS timeout: {name} {rtype}") from None
        except (dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
            self._count(rtype, "servfail", time.perf_counter() - start)
            raise DnsServFail(f"DNS failure: {name} {rtype}: {type(exc).__name__}") from None
        finally:
            if budget is not None:
                budget.charge(time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        # an answer reached through CNAMEs is good for as long as every link of the chain
        chain_ttl = int(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            self._store(key, (), min(self._negative_ttl([answer.response]), chain_ttl), now)
            self._count(rtype, "nodata", elapsed)
            return ()
        records = tuple(answer.rrset)
        self._store(key, records, chain_ttl, now)
        self._count(rtype, "ok", elapsed)
        return records

    def txt(self, name: str, *, budget: Budget | None = None,
            gate: Gate | None = None) -> tuple[bytes, ...]:
        """Each TXT record at `name`, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return tuple(b"".join(r.strings)
                     for r in self.query(name, "TXT", budget=budget, gate=gate))

    def bind(self, budget: Budget, gate: Gate | None = None) -> BoundResolver:
        """This resolver as one transaction sees it: every lookup charged to `budget`, and
        refused when `gate` says lookups may not wait."""
        return BoundResolver(self, budget, gate)

    # -- internals ------------------------------------------------------------------------

    def _negative_ttl(self, responses: Any) -> int:
        for response in responses:
            for rrset in getattr(response, "authority", ()):
                if rrset.rdtype == dns.rdatatype.SOA:
                    return int(min(rrset.ttl, rrset[0].minimum))
        return self.settings.negative_ttl

    def _store(self, key: tuple[str, int], records: tuple[Rdata, ...], ttl: int,
               now: float) -> None:
        """Cache an answer, and note its expiry in the current `Trace` (an answer not
        cached spoils it: what was computed from it cannot be kept either)."""
        if self.settings.cache_size <= 0 or ttl <= 0:
            spoil()
            return
        expires = now + min(ttl, self.settings.max_ttl)
        _note(expires)
        with self._lock:
            self._cache[key] = (expires, records)
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)

    def _count(self, rtype: str, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.dns_queries.labels(rtype=rtype, outcome=outcome).inc()
            if outcome != "cached":
                self._metrics.dns_duration.labels(rtype=rtype).observe(seconds)


def valid_name(name: str) -> bool:
    """Can DNS carry `name` (RFC 1035 §2.3.4: labels of 1-63 octets, 253 in all, ASCII)?"""
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(0 < len(label) < 64 for label in name.split("."))


class Budget:
    """The DNS time one message may spend, all its lookups together (SPF, DKIM, DMARC).

    Cached answers cost nothing. One transaction is served by one thread at a time, so the
    account needs no lock.
    """

    def __init__(self, total: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.spent = 0.0
        self._clock = clock

    def remaining(self) -> float:
        return self.total - self.spent

    def charge(self, seconds: float) -> None:
        self.spent += max(seconds, 0.0)


@dataclass(frozen=True, slots=True)
class BoundResolver:
    """The shared resolver with one message's budget: what checks are given."""

    resolver: Resolver
    budget: Budget
    gate: Gate | None = None

    @property
    def refused(self) -> bool:
        """Was a lookup refused because it would have waited (see `Gate`)?"""
        return self.gate is not None and self.gate.refused

    def query(self, name: str, rtype: str) -> tuple[Rdata, ...]:
        return self.resolver.query(name, rtype, budget=self.budget, gate=self.gate)

    def txt(self, name: str) -> tuple[bytes, ...]:
        return self.resolver.txt(name, budget=self.budget, gate=self.gate)

    def dkim_txt(self, name: bytes | str, timeout: object = None) -> bytes | None:
        """dkimpy's `dnsfunc`: the first TXT record at `name`, or None. Raises DnsError."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(text)
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's lookup result shape (see `pyspf_lookup`), through this resolver."""
        try:
            records = self.query(name, qtype)
        except DnsError as exc:
            raise spf.TempError(str(exc)) from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                if b"%{t" in b"".join(r.strings).lower():
                    spoil()  # the time macro (RFC 7208 §7.3): the result is the moment's
                out.append(((name, qtype), r.strings))
        return out


# -- pyspf ------------------------------------------------------------------------------------
# pyspf resolves through one module global, `spf.DNSLookup`. It is set once, to `pyspf_lookup`,
# which finds the resolver of the transaction being evaluated in a context variable (each
# milter thread has its own context): no swapping of the global per connection or per reload.

_PYSPF_RESOLVER: contextvars.ContextVar[BoundResolver] = contextvars.ContextVar("pyspf")


def pyspf_lookup(name: str, qtype: str, strict: object = True, timeout: object = None
                 ) -> list[tuple[tuple[str, str], Any]]:
    """`spf.DNSLookup`: a lookup through the current transaction's resolver, never another."""
    bound = _PYSPF_RESOLVER.get(None)
    if bound is None:
        raise spf.TempError("no mailward resolver bound for this SPF evaluation")
    return bound.spf_lookup(name, qtype)


def install_pyspf() -> None:
    """Point pyspf's global lookup at `pyspf_lookup` (idempotent; done when services are
    built, before milter threads start: STYLE.md §6)."""
    spf.DNSLookup = pyspf_lookup


def pyspf_installed() -> bool:
    return spf.DNSLookup is pyspf_lookup


@contextlib.contextmanager
def pyspf_scope(bound: BoundResolver) -> Iterator[None]:
    """Let pyspf's lookups in this block use `bound`."""
    token = _PYSPF_RESOLVER.set(bound)
    try:
        yield
    finally:
        _PYSPF_RESOLVER.reset(token)
