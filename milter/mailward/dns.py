"""The one DNS layer: a dnspython resolver, a TTL-respecting cache, adapters for pyspf/dkimpy.

Every SPF, DKIM and DMARC lookup goes through `Resolver.query`, so each is bounded (per-try
`timeout`, per-lookup `lifetime`), cached (positive answers for their TTL, NXDOMAIN and NODATA
for the SOA minimum, RFC 2308 §5, both capped by `max_ttl`), counted
(`mailward_dns_queries_total{rtype,outcome}`) and timed (`mailward_dns_duration_seconds`).
A timeout or SERVFAIL raises `DnsTimeout` / `DnsServFail` (checks map them to `temperror`,
never to `fail` or `none`); these are not cached, so the next message asks again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailward.config import DnsSettings
from mailward.errors import MailwardError


class DnsError(MailwardError):
    """A lookup could not be answered; the result is temporary (temperror)."""


class DnsTimeout(DnsError, TimeoutError):
    """No answer within the configured lifetime."""


class DnsServFail(DnsError):
    """The servers answered SERVFAIL/REFUSED, or an unusable response."""


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

    # -- the one entry point --------------------------------------------------------------

    def query(self, name: str, rtype: str) -> tuple[Rdata, ...]:
        """The records of `rtype` at `name`; `()` for NXDOMAIN or no such records."""
        key = (name.lower().rstrip("."), dns.rdatatype.from_text(rtype))
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                self._count(rtype, "cached", 0.0)
                return hit[1]
        start = time.perf_counter()
        try:
            answer = self._resolver.resolve(key[0] + ".", key[1], search=False,
                                            raise_on_no_answer=False)
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
        elapsed = time.perf_counter() - start
        if answer.rrset is None:
            self._store(key, (), self._negative_ttl([answer.response]), now)
            self._count(rtype, "nodata", elapsed)
            return ()
        records = tuple(answer.rrset)
        self._store(key, records, answer.rrset.ttl, now)
        self._count(rtype, "ok", elapsed)
        return records

    def txt(self, name: str) -> tuple[bytes, ...]:
        """Each TXT record at `name`, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return tuple(b"".join(r.strings) for r in self.query(name, "TXT"))

    # -- adapters -------------------------------------------------------------------------

    def spf_lookup(self, name: str, qtype: str, strict: object = True,
                   timeout: object = None) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's `spf.DNSLookup` signature and result shape, through this resolver."""
        import spf

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
                out.append(((name, qtype), r.strings))
        return out

    def dkim_txt(self, name: bytes | str, timeout: object = None) -> bytes | None:
        """dkimpy's `dnsfunc`: the first TXT record at `name`, or None. Raises DnsError."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(text)
        return records[0] if records else None

    def install(self) -> None:
        """Make pyspf resolve through this resolver (its lookup is a module global).

        Call once at start-up (and on reload), before milter threads start (STYLE.md §6).
        """
        import spf

        spf.DNSLookup = self.spf_lookup

    # -- internals ------------------------------------------------------------------------

    def _negative_ttl(self, responses: Any) -> int:
        for response in responses:
            for rrset in getattr(response, "authority", ()):
                if rrset.rdtype == dns.rdatatype.SOA:
                    return int(min(rrset.ttl, rrset[0].minimum))
        return self.settings.negative_ttl

    def _store(self, key: tuple[str, int], records: tuple[Rdata, ...], ttl: int,
               now: float) -> None:
        if self.settings.cache_size <= 0 or ttl <= 0:
            return
        with self._lock:
            self._cache[key] = (now + min(ttl, self.settings.max_ttl), records)
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)

    def _count(self, rtype: str, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.dns_queries.labels(rtype=rtype, outcome=outcome).inc()
            if outcome != "cached":
                self._metrics.dns_duration.labels(rtype=rtype).observe(seconds)
