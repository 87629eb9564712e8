"""`mailward sts run`: the MTA-STS policy service Postfix's SMTP client asks through
`smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix`.

A lookup is answered from the cache whenever it holds an unexpired policy, without waiting for
the network; a lookup that finds none discovers the policy there and then (TXT, then HTTPS)
and caches it. A background thread keeps cached policies fresh (RFC 8461 §5.1): it compares
the TXT `id` of every policy looked up or not checked for `[sts] refresh_interval`, refetches
on a new id or once half of `max_age` has gone, and when a refresh fails keeps the cached
policy until it expires: blocking HTTPS or DNS never downgrades a domain that asked for TLS.

Answers (Postfix's TLS policy table syntax): `secure match=PATTERNS servername=hostname` for
`enforce`; `dane-only` for an `enforce` domain whose every MX host has DNSSEC-validated TLSA
records, when `[sts] dane_resolver` names a validating resolver (RFC 8461 §2: DANE first);
nothing (NOTFOUND: Postfix's own default) for `testing`, `none`, no policy and keys that name
no domain; TEMP (Postfix defers the mail) when the cache fails.

Room for TLSRPT (RFC 8460): Postfix 3.10 accepts `policy_type=sts policy_domain=...
policy_string=... mx_host_pattern=...` attributes in the answer for its TLSRPT client; the
answer is built in one place (`Answer.text`) with the policy at hand, so they can be added
there once Debian's Postfix has the hooks (3.7 has none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, replace

from mailward import __version__
from mailward.core.settings import StsSettings
from mailward.services.dns import DnsError, DnsSettings, Resolver
from mailward.services.metrics import StsMetrics
from mailward.services.sdnotify import Notifier
from mailward.sts import netstring
from mailward.sts.cache import Cache, CacheError, Entry, open_cache
from mailward.sts.fetch import FetchError, dane_validated, fetch_policy, tls_context, txt_id
from mailward.sts.policy import Mode, lookup_domain, postfix_answer

log = logging.getLogger("mailward.sts")

MAX_REQUEST = 1024  # a socketmap request: the map name, a space and a domain
# After a failed fetch, lookups of that domain answer "no policy" at once for this long rather
# than each waiting out another fetch (one after the other, behind the domain's lock): a
# policy host that hangs must not stall every delivery to its domain past Postfix's patience.
FAILED_FETCH_BACKOFF = 300.0
MAX_FAILED = 10000
MAX_CONNECTIONS = 512
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Answer:
    """One lookup's result: what Postfix is told and where it came from."""

    domain: str
    kind: str  # a mailward_sts_lookups_total answer label
    text: str | None  # the policy-table value; None: NOTFOUND
    source: str  # cache, fetched, none
    entry: Entry | None = None
    note: str = ""

    def reply(self) -> bytes:
        if self.kind == "temp":
            return b"TEMP " + self.note.encode("ascii", "replace")[:200]
        return b"OK " + self.text.encode("ascii") if self.text else b"NOTFOUND "


class PolicyService:
    def __init__(self, settings: StsSettings, resolver: Resolver, cache: Cache,
                 metrics: StsMetrics, *, clock: object = time.time,
                 context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.cache = cache
        self.metrics = metrics
        self._clock = clock
        self._context = context or tls_context(settings.ca_file)
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()
        self._pending: queue.Queue[str] = queue.Queue(maxsize=10000)
        self._queued: set[str] = set()
        self._failed: dict[str, float] = {}  # domain -> until when a fetch is not retried
        self._stop = threading.Event()

    def now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    # -- lookups --------------------------------------------------------------------------

    def lookup(self, key: str, *, fetch: bool = True) -> Answer:
        """The answer for a lookup key; never raises. `fetch=False` answers from the cache
        only (what `query --cached` shows)."""
        try:
            answer = self._lookup(key, fetch=fetch)
        except CacheError as exc:
            log.error("sts cache: %s", exc)
            answer = Answer(key, "temp", None, "none", note="policy cache unavailable")
        except Exception:
            log.exception("sts lookup of %r failed", key[:300])
            answer = Answer(key, "temp", None, "none", note="internal error")
        self.metrics.lookups.labels(answer=answer.kind).inc()
        return answer

    def _lookup(self, key: str, *, fetch: bool) -> Answer:
        domain = lookup_domain(key)
        if domain is None:
            return Answer(key, "notadomain", None, "none", note="not a domain MTA-STS covers")
        now = self.now()
        entry = self.cache.get(domain)
        if entry is not None and entry.expires > now:
            if now - entry.checked >= self.settings.refresh_interval:
                self.schedule(domain)
            return self._answer(entry, "cache")
        if not fetch:
            return Answer(domain, "nopolicy", None, "none", entry,
                          note="expired" if entry else "not cached")
        with self._lock_for(domain):
            entry = self.cache.get(domain)  # another thread may have fetched it meanwhile
            if entry is not None and entry.expires > now:
                return self._answer(entry, "cache")
            return self._discover(domain, entry)

    def _discover(self, domain: str, stale: Entry | None) -> Answer:
        try:
            policy_id = txt_id(domain, self.resolver)
        except DnsError as exc:
            return Answer(domain, "nopolicy", None, "none", stale, note=f"TXT lookup: {exc}")
        if policy_id is None:
            if stale is not None:
                self.cache.delete(domain)
            return Answer(domain, "nopolicy", None, "none", note="no MTA-STS TXT record")
        now = self.now()
        if self._failed.get(domain, 0.0) > now:
            return Answer(domain, "nopolicy", None, "none", stale,
                          note="policy fetch failed recently; retried later")
        entry = self._fetch(domain, policy_id)
        if entry is None:
            if stale is not None:
                self.cache.delete(domain)  # expired, and no fresh one: RFC 8461 §5.1
            with self._locks_guard:
                if len(self._failed) >= MAX_FAILED:
                    self._failed = {d: t for d, t in self._failed.items() if t > now}
                if len(self._failed) < MAX_FAILED:
                    self._failed[domain] = now + FAILED_FETCH_BACKOFF
            return Answer(domain, "nopolicy", None, "none", note="policy fetch failed")
        self._failed.pop(domain, None)
        self.cache.put(entry)
        return self._answer(entry, "fetched")

    def _fetch(self, domain: str, policy_id: str, *, old: Entry | None = None) -> Entry | None:
        try:
            got = fetch_policy(domain, self.resolver, self.settings, self._context)
        except FetchError as exc:
            self.metrics.fetches.labels(outcome=exc.outcome).inc()
            log.warning("sts fetch %s: %s", domain, exc)
            return None
        self.metrics.fetches.labels(outcome="ok").inc()
        now = self.now()
        dane = self._dane(domain, got.policy.mode)
        log.info("sts policy %s id=%s mode=%s max_age=%d mx=%s%s (was %s)", domain, policy_id,
                 got.policy.mode, got.policy.max_age, ",".join(got.policy.mx),
                 " dane" if dane else "", old.policy_id if old else "none")
        return Entry(domain, policy_id, got.policy, fetched=now,
                     expires=now + got.policy.max_age, checked=now, dane=dane)

    def _dane(self, domain: str, mode: Mode) -> bool:
        """Whether DANE takes this enforce domain's place (see fetch.dane_validated)."""
        if not self.settings.dane_resolver or mode is not Mode.ENFORCE:
            return False
        return dane_validated(domain, self.resolver, self.settings.dane_resolver,
                              self.settings.fetch_timeout)

    def _answer(self, entry: Entry, source: str) -> Answer:
        mode = entry.policy.mode
        if mode is Mode.ENFORCE and entry.dane:
            return Answer(entry.domain, "dane", "dane-only", source, entry)
        text = postfix_answer(entry.policy)
        kind = "secure" if text else str(mode)
        return Answer(entry.domain, kind, text, source, entry)

    def _lock_for(self, domain: str) -> _DomainLock:
        return _DomainLock(self, domain)

    # -- refresh --------------------------------------------------------------------------

    def schedule(self, domain: str) -> None:
        """Have the refresher look at `domain` soon (at most once in the queue)."""
        with self._locks_guard:
            if domain in self._queued:
                return
            self._queued.add(domain)
        try:
            self._pending.put_nowait(domain)
        except queue.Full:
            with self._locks_guard:
                self._queued.discard(domain)

    def refresh(self, domain: str) -> str:
        """Check one cached policy now; returns the refresh outcome label."""
        entry = self.cache.get(domain)
        now = self.now()
        if entry is None:
            return "dropped"
        if entry.expires <= now:
            self.cache.delete(domain)
            outcome = "dropped"
        else:
            outcome = self._refresh(entry, now)
        self.metrics.refreshes.labels(outcome=outcome).inc()
        return outcome

    def _refresh(self, entry: Entry, now: float) -> str:
        try:
            policy_id = txt_id(entry.domain, self.resolver)
        except DnsError as exc:
            self.cache.put(entry.checked_now(now, f"TXT lookup: {exc}"))
            return "failed"
        half_gone = now - entry.fetched >= entry.policy.max_age / 2
        if policy_id is not None and policy_id == entry.policy_id and not half_gone:
            # TLSA records come and go without the policy changing: look again
            dane = self._dane(entry.domain, entry.policy.mode)
            self.cache.put(replace(entry.checked_now(now), dane=dane))
            return "unchanged"
        # a new id, or time to renew; a vanished TXT record alone removes nothing
        # (RFC 8461 §8.3: a domain withdraws with a `mode: none` policy)
        fresh = self._fetch(entry.domain, policy_id or entry.policy_id, old=entry)
        if fresh is None:
            self.cache.put(entry.checked_now(now, "refetch failed; cached policy kept"))
            return "failed"
        self.cache.put(fresh)
        return "refetched"

    def sweep(self) -> None:
        """Drop expired policies, queue those not checked for refresh_interval, count."""
        now = self.now()
        self.cache.drop_expired(now)
        entries = self.cache.entries()
        self.metrics.cache_policies.set(len(entries))
        for e in entries:
            if now - e.checked >= self.settings.refresh_interval:
                self.schedule(e.domain)

    def run_refresher(self) -> None:
        """The background thread: sweep every refresh_interval / 4, refresh what is queued."""
        next_sweep = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_sweep:
                try:
                    self.sweep()
                except CacheError as exc:
                    log.error("sts cache: %s", exc)
                next_sweep = time.monotonic() + max(1.0, self.settings.refresh_interval / 4)
            try:
                domain = self._pending.get(timeout=1.0)
            except queue.Empty:
                continue
            with self._locks_guard:
                self._queued.discard(domain)
            try:
                with self._lock_for(domain):
                    self.refresh(domain)
            except CacheError as exc:
                log.error("sts cache: %s", exc)
            except Exception:
                log.exception("sts refresh of %s failed", domain)

    def stop(self) -> None:
        self._stop.set()


class _DomainLock:
    """One lock per domain while anyone holds it: one fetch per domain at a time."""

    def __init__(self, service: PolicyService, domain: str) -> None:
        self.service, self.domain = service, domain

    def __enter__(self) -> None:
        s = self.service
        with s._locks_guard:
            lock, users = s._locks.get(self.domain, (threading.Lock(), 0))
            s._locks[self.domain] = (lock, users + 1)
        lock.acquire()
        self._lock = lock

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        s = self.service
        with s._locks_guard:
            lock, users = s._locks[self.domain]
            if users == 1:
                del s._locks[self.domain]
            else:
                s._locks[self.domain] = (lock, users - 1)


# -- the socketmap server ----------------------------------------------------------------------

class _Handler(socketserver.BaseRequestHandler):
    server: _UnixServer | _TcpServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(IDLE_TIMEOUT)
        service, name = self.server.service, self.server.map_name
        buffer = b""
        try:
            while True:
                try:
                    got = netstring.decode(buffer, MAX_REQUEST)
                except netstring.NetstringError as exc:
                    log.warning("sts: bad request (%s); connection closed", exc)
                    return
                if got is None:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                request, buffer = got
                conn.sendall(netstring.encode(self._reply(service, name, request)))
        except (OSError, TimeoutError):
            return

    @staticmethod
    def _reply(service: PolicyService, name: str, request: bytes) -> bytes:
        map_name, sep, key = request.partition(b" ")
        if not sep or map_name.decode("ascii", "replace") != name:
            return b"PERM unknown map name (expected " + name.encode() + b")"
        try:
            text = key.decode("ascii")
        except UnicodeDecodeError:
            service.metrics.lookups.labels(answer="notadomain").inc()
            return b"NOTFOUND "
        return service.lookup(text).reply()


class _Limited:
    """Refuse connections past MAX_CONNECTIONS (each holds a thread)."""

    service: PolicyService
    map_name: str
    _slots: threading.BoundedSemaphore

    def verify_request(self, request: object, client_address: object) -> bool:
        if not self._slots.acquire(blocking=False):
            log.warning("sts: %d connections open; refusing another", MAX_CONNECTIONS)
            return False
        return True

    def shutdown_request(self, request: object) -> None:
        super().shutdown_request(request)  # type: ignore[misc]
        self._slots.release()


class _UnixServer(_Limited, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class _TcpServer(_Limited, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


def make_server(service: PolicyService) -> _UnixServer | _TcpServer:
    """The listener `[sts] listen` names, ready to serve_forever()."""
    kind, _, rest = service.settings.listen.partition(":")
    server: _UnixServer | _TcpServer
    if kind == "unix":
        if os.path.exists(rest) and not os.path.isfile(rest):
            os.unlink(rest)
        old = os.umask(0o117)  # 0660: the owner and its group (Postfix joins it)
        try:
            server = _UnixServer(rest, _Handler)
        finally:
            os.umask(old)
    else:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        server = (_Tcp6Server if ":" in host else _TcpServer)((host, int(port)), _Handler)
    server.service = service
    server.map_name = service.settings.map_name
    server._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    return server


def run(settings: StsSettings, dns: DnsSettings) -> int:
    """Serve until SIGTERM or SIGINT: the listener, the refresher and the metrics."""
    metrics = StsMetrics()
    service = PolicyService(settings, Resolver(dns, metrics=metrics), open_cache(settings),
                            metrics)
    server = make_server(service)
    if settings.metrics is not None:
        metrics.serve(*settings.metrics)
    threading.Thread(target=service.run_refresher, name="sts-refresh", daemon=True).start()
    stopped = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker = threading.Thread(target=server.serve_forever, name="sts-serve", daemon=True)
    worker.start()
    log.info("mailward sts %s listening on %s (map %s, cache %s)", __version__, settings.listen,
             settings.map_name, settings.cache)
    notifier = Notifier()
    notifier.send("READY=1")
    while not stopped.wait(1.0):
        pass
    notifier.send("STOPPING=1")
    service.stop()
    server.shutdown()
    server.server_close()
    if settings.listen.startswith("unix:"):
        with contextlib.suppress(OSError):
            os.unlink(settings.listen[5:])
    log.info("mailward sts stopped")
    return 0
