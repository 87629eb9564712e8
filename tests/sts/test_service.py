"""The policy service against real parts: the lab DNS server, an HTTPS server with a test CA,
SQLite and a real Redis, and the socketmap protocol over real sockets."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailward.core.settings import StsCache, StsSettings
from mailward.lab.dns import Nameserver
from mailward.lab.postfix import free_port
from mailward.lab.tlslab import PolicyServer, Site, TestCA
from mailward.services.dns import DnsSettings, Resolver
from mailward.services.metrics import StsMetrics
from mailward.sts import netstring
from mailward.sts.cache import Cache, RedisCache, SqliteCache, open_cache
from mailward.sts.fetch import is_public
from mailward.sts.service import PolicyService, make_server

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.sts.test\nmx: *.pool.sts.test\nmax_age: 86400\n"
SECURE = "secure match=mx1.sts.test:.pool.sts.test servername=hostname"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def https(ca: TestCA) -> Iterator[PolicyServer]:
    cert, key = ca.issue("policy", ["mta-sts.sts.test", "mta-sts.other.test",
                                    "mta-sts.testing.test", "mta-sts.dane.test"])
    server = PolicyServer(cert, key)
    yield server
    server.close()


@dataclasses.dataclass
class World:
    dns: Nameserver
    https: PolicyServer
    settings: StsSettings
    clock: Clock
    metrics: StsMetrics
    cache: Cache

    def service(self, **changes: object) -> PolicyService:
        settings = dataclasses.replace(self.settings, **changes)  # type: ignore[arg-type]
        resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", self.dns.port),),
                                        timeout=1, lifetime=2, cache_size=0))
        return PolicyService(settings, resolver, self.cache, self.metrics, clock=self.clock)

    def publish(self, domain: str, text: str, policy_id: str = "one") -> None:
        for key in [k for k in self.dns.rrsets if k[0].to_text() == f"_mta-sts.{domain}."]:
            del self.dns.rrsets[key]
        self.dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={policy_id};"')
        self.dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
        self.https.policy(domain, text)

    def fetches(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("mailward_sts_fetches_total",
                                                      {"outcome": outcome}) or 0.0


@pytest.fixture(params=["sqlite", "redis"])
def world(request: pytest.FixtureRequest, nameserver: Nameserver, https: PolicyServer,
          ca: TestCA, tmp_path: Path) -> World:
    https.sites.clear()
    https.hits.clear()
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        settings = StsSettings(cache=StsCache.REDIS, redis_url=url)
    else:
        settings = StsSettings(cache_path=str(tmp_path / "sts.sqlite"))
    settings = dataclasses.replace(settings, ca_file=str(ca.ca_file), https_port=https.port,
                                   fetch_timeout=2, refresh_interval=60,
                                   allow_private_addresses=True)  # the lab is on loopback
    cache = open_cache(settings)
    cache.purge()
    return World(nameserver, https, settings, Clock(), StsMetrics(), cache)


def test_enforce_is_fetched_once_then_answered_from_the_cache(world: World) -> None:
    world.publish("sts.test", ENFORCE)
    service = world.service()
    first = service.lookup("sts.test")
    assert (first.kind, first.text, first.source) == ("secure", SECURE, "fetched")
    again = service.lookup("STS.test.")
    assert (again.text, again.source) == (SECURE, "cache")
    assert world.https.hits == {"mta-sts.sts.test": 1}
    assert world.metrics.registry.get_sample_value("mailward_sts_lookups_total",
                                                   {"answer": "secure"}) == 2
    assert world.fetches("ok") == 1
    assert first.reply() == b"OK " + SECURE.encode()
    # persistent: a new service on the same store (a restart) answers without fetching
    assert world.service().lookup("sts.test").source == "cache"
    assert world.https.hits == {"mta-sts.sts.test": 1}


def test_testing_none_and_no_policy_leave_postfix_its_default(world: World) -> None:
    world.publish("testing.test", ENFORCE.replace("enforce", "testing"))
    service = world.service()
    answer = service.lookup("testing.test")
    assert (answer.kind, answer.text, answer.reply()) == ("testing", None, b"NOTFOUND ")
    assert answer.entry is not None and world.cache.get("testing.test") is not None
    assert service.lookup("nothing.test").kind == "nopolicy"
    assert service.lookup(".sts.test").kind == "notadomain"
    assert service.lookup("[192.0.2.1]:25").kind == "notadomain"


@pytest.mark.parametrize(("site", "outcome"), [
    (Site(b"", status=404), "http_error"),
    (Site(b"", status=301, location="https://evil.test/"), "http_error"),
    (Site(ENFORCE.encode(), content_type="text/html"), "invalid"),
    (Site(b"version: STSv1\nmode: enforce\n"), "invalid"),
    (Site(b"version: STSv1\n" + b"x: " + b"y" * 70000 + b"\n"), "too_large"),
    (Site(ENFORCE.encode(), trickle=0.05), "timeout"),
])
def test_a_policy_that_cannot_be_had_is_no_policy(world: World, site: Site,
                                                  outcome: str) -> None:
    world.publish("sts.test", ENFORCE)
    world.https.sites["mta-sts.sts.test"] = site
    answer = world.service().lookup("sts.test")
    assert (answer.kind, answer.text) == ("nopolicy", None)
    assert world.fetches(outcome) == 1
    assert world.cache.get("sts.test") is None


def test_a_failed_fetch_is_not_retried_by_every_lookup(world: World) -> None:
    world.publish("sts.test", ENFORCE)
    world.https.sites["mta-sts.sts.test"] = Site(ENFORCE.encode(), trickle=0.05)
    service = world.service()
    assert service.lookup("sts.test").kind == "nopolicy"
    started = time.monotonic()
    again = service.lookup("sts.test")
    assert (again.kind, again.note) == ("nopolicy",
                                        "policy fetch failed recently; retried later")
    # not fetched again: that would take the 2 s fetch timeout, and count a second timeout
    assert time.monotonic() - started < 1.9 and world.fetches("timeout") == 1
    # five minutes later the host works again, and the policy is fetched
    world.https.sites["mta-sts.sts.test"] = Site(ENFORCE.encode())
    world.clock.now += 301
    assert service.lookup("sts.test").kind == "secure"


def test_a_policy_host_on_a_private_address_is_not_connected_to(world: World) -> None:
    """Whoever can make our MTA send to their domain (a bounce will do) must not have the
    service connect inside our network: mta-sts.DOMAIN on 127.0.0.1, a private or a link-local
    address is not fetched from unless allow_private_addresses says so."""
    world.publish("sts.test", ENFORCE)
    world.dns.add("mta-sts.sts.test", "A", "10.1.2.3")
    world.dns.add("mta-sts.sts.test", "AAAA", "fe80::1")
    answer = world.service(allow_private_addresses=False).lookup("sts.test")
    assert answer.kind == "nopolicy" and world.fetches("private_address") == 1
    assert world.https.hits == {}  # nothing reached the policy server on 127.0.0.1
    # allowed (as the lab is), on 127.0.0.1 only, it is fetched once the back-off is over
    for key in [k for k in world.dns.rrsets if k[0].to_text() == "mta-sts.sts.test."]:
        del world.dns.rrsets[key]
    world.publish("sts.test", ENFORCE)
    world.clock.now += 301
    assert world.service().lookup("sts.test").kind == "secure"
    assert world.https.hits == {"mta-sts.sts.test": 1}


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("64:ff9b::8.8.8.8", True),
    ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("100.64.0.1", False),
    ("169.254.1.1", False), ("192.0.2.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1", False), ("fc00::1", False), ("2001:db8::1", False), ("::ffff:10.1.2.3", False),
    ("64:ff9b::10.1.2.3", False), ("64:ff9b::127.0.0.1", False)])
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_a_certificate_for_another_name_is_refused(world: World, ca: TestCA) -> None:
    cert, key = ca.issue("wrong", ["mta-sts.elsewhere.test"])
    wrong = PolicyServer(cert, key)
    try:
        world.publish("sts.test", ENFORCE)
        wrong.policy("sts.test", ENFORCE)
        answer = world.service(https_port=wrong.port).lookup("sts.test")
        assert answer.kind == "nopolicy" and world.fetches("tls_error") == 1
        # and without the test CA, the system's trust store does not know it
        world.clock.now += 301  # past the failed fetch's back-off
        answer = world.service(ca_file="").lookup("sts.test")
        assert answer.kind == "nopolicy" and world.fetches("tls_error") == 2
    finally:
        wrong.close()


def test_a_new_id_is_refetched_and_a_failed_refresh_keeps_the_policy(world: World) -> None:
    world.publish("sts.test", ENFORCE)
    service = world.service()
    assert service.lookup("sts.test").text == SECURE
    world.clock.now += 120
    assert service.refresh("sts.test") == "unchanged"
    # the domain changes its policy and its id
    world.publish("sts.test", ENFORCE.replace("mx1.sts.test", "mx9.sts.test"), "two")
    world.clock.now += 120
    assert service.refresh("sts.test") == "refetched"
    assert service.lookup("sts.test").text == SECURE.replace("mx1", "mx9")
    # HTTPS blocked (an attacker, or an outage) and a new id: the cached policy stays
    world.https.sites.clear()
    world.publish("sts.test", ENFORCE, "three")
    world.https.sites.clear()
    assert service.refresh("sts.test") == "failed"
    entry = world.cache.get("sts.test")
    assert entry is not None and entry.policy_id == "two" and "refetch failed" in entry.error
    assert service.lookup("sts.test").text == SECURE.replace("mx1", "mx9")
    # the TXT record gone, DNS failing: still the cached policy (RFC 8461 §5.1, §8.3)
    world.dns.servfail.add("_mta-sts.sts.test")
    assert service.refresh("sts.test") == "failed"
    assert service.lookup("sts.test").text == SECURE.replace("mx1", "mx9")


def test_expiry_half_life_and_the_background_sweep(world: World) -> None:
    world.publish("sts.test", ENFORCE.replace("86400", "1000"))
    service = world.service()
    service.lookup("sts.test")
    world.clock.now += 501  # half of max_age gone: renewed before it expires
    assert service.refresh("sts.test") == "refetched"
    entry = world.cache.get("sts.test")
    assert entry is not None and entry.expires == world.clock.now + 1000
    # a lookup of a policy not checked for refresh_interval queues it for the refresher
    world.clock.now += 61
    assert service.lookup("sts.test").source == "cache"
    assert service._pending.get_nowait() == "sts.test"
    # expired, and the HTTPS server gone: the policy no longer applies
    world.https.sites.clear()
    world.clock.now += 1001
    answer = service.lookup("sts.test")
    assert answer.kind == "nopolicy" and world.cache.get("sts.test") is None
    service.sweep()
    assert world.metrics.registry.get_sample_value("mailward_sts_cache_policies") == 0


def test_the_background_thread_renews_a_changed_policy(world: World) -> None:
    """The refresher as it runs in the service, on the real clock: a policy whose TXT id
    changes is refetched without any lookup waiting for it."""
    world.publish("sts.test", ENFORCE)
    service = world.service(refresh_interval=0.2)
    service._clock = time.time
    assert service.lookup("sts.test").text == SECURE
    world.publish("sts.test", ENFORCE.replace("mx1.sts.test", "mx7.sts.test"), "two")
    thread = threading.Thread(target=service.run_refresher, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while (entry := world.cache.get("sts.test")) is None or entry.policy_id != "two":
            assert time.monotonic() < deadline, "the refresher did not renew the policy"
            time.sleep(0.1)
    finally:
        service.stop()
        thread.join(5)
    assert service.lookup("sts.test", fetch=False).text == SECURE.replace("mx1", "mx7")
    assert world.metrics.registry.get_sample_value("mailward_sts_refreshes_total",
                                                   {"outcome": "refetched"}) == 1


def test_a_broken_cache_answers_temp_never_no_policy(world: World, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    broken = RedisCache(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    service = PolicyService(world.settings, Resolver(DnsSettings(
        nameservers=(("127.0.0.1", world.dns.port),))), broken, world.metrics)
    answer = service.lookup("sts.test")
    assert answer.kind == "temp" and answer.reply().startswith(b"TEMP ")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(Exception, match="sqlite"):
        SqliteCache(str(garbage))


def test_dane_steps_in_only_when_validated(world: World) -> None:
    world.publish("dane.test", ENFORCE.replace("sts.test", "dane.test"))
    world.dns.add("dane.test", "MX", "10 mx1.dane.test.")
    world.dns.add("_25._tcp.mx1.dane.test", "TLSA", "3 1 1 " + "ab" * 32)
    validator = ("127.0.0.1", world.dns.port)
    # the resolver does not say "validated": a spoofable TLSA answer changes nothing
    answer = world.service(dane_resolver=validator).lookup("dane.test")
    assert answer.kind == "secure"
    world.cache.purge()
    world.dns.validated.add("_25._tcp.mx1.dane.test")
    service = world.service(dane_resolver=validator)
    answer = service.lookup("dane.test")
    assert (answer.kind, answer.text) == ("dane", "dane-only")
    # the TLSA records withdrawn, the policy unchanged: the next refresh notices
    world.dns.validated.clear()
    world.clock.now += 120
    assert service.refresh("dane.test") == "unchanged"
    assert service.lookup("dane.test").kind == "secure"
    world.cache.purge()
    # DANE not configured: MTA-STS as published
    assert world.service().lookup("dane.test").kind == "secure"


def _ask(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(netstring.encode(request))
    buffer = b""
    while (got := netstring.decode(buffer, 100000)) is None:
        chunk = sock.recv(4096)
        assert chunk, "the service closed the connection"
        buffer += chunk
    return got[0]


@pytest.mark.parametrize("kind", ["inet", "unix"])
def test_the_socketmap_protocol(world: World, tmp_path: Path, kind: str) -> None:
    world.publish("sts.test", ENFORCE)
    listen = (f"inet:127.0.0.1:{free_port()}" if kind == "inet"
              else f"unix:{tmp_path / 'sts.sock'}")
    server = make_server(world.service(listen=listen))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        if kind == "inet":
            sock = socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])))
        else:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(listen[5:])
            assert (tmp_path / "sts.sock").stat().st_mode & 0o777 == 0o660
        with sock:
            sock.settimeout(10)
            # several lookups on one connection, as Postfix does
            assert _ask(sock, b"postfix sts.test") == b"OK " + SECURE.encode()
            assert _ask(sock, b"postfix nothing.test") == b"NOTFOUND "
            assert _ask(sock, b"postfix .sts.test") == b"NOTFOUND "
            assert _ask(sock, b"postfix \xff\xfe") == b"NOTFOUND "
            assert _ask(sock, b"other sts.test").startswith(b"PERM ")
            assert _ask(sock, b"postfix").startswith(b"PERM ")
            # a peer that does not speak netstrings is cut off
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(100) == b""
    finally:
        server.shutdown()
        server.server_close()


def test_query_and_purge_commands(world: World, tmp_path: Path) -> None:
    world.publish("sts.test", ENFORCE)
    ini = tmp_path / "mailward.ini"
    store = (f"cache = redis\nredis_url = {world.settings.redis_url}\n"
             if world.settings.cache is StsCache.REDIS
             else f"cache_path = {world.settings.cache_path}\n")
    ini.write_text(f"[dns]\nnameservers = 127.0.0.1:{world.dns.port}\n[sts]\n{store}"
                   f"ca_file = {world.settings.ca_file}\nhttps_port = {world.https.port}\n"
                   "allow_private_addresses = yes\n")

    def mailward(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailward", "sts", *args, "-c", str(ini)],
                              capture_output=True, text=True, check=False, timeout=60)

    cached = mailward("query", "sts.test", "--cached")
    assert cached.returncode == 0 and "not cached" in cached.stdout
    done = mailward("query", "sts.test", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["answer"], data["source"]) == (SECURE, "fetched")
    assert data["policy"]["policy_id"] == "one"
    listing = mailward("query")
    assert "sts.test mode=enforce id=one mx=mx1.sts.test,*.pool.sts.test" in listing.stdout
    assert "from cache" in mailward("query", "sts.test").stdout
    purged = mailward("purge", "sts.test")
    assert purged.stdout == "1 cached policy dropped\n"
    assert world.cache.get("sts.test") is None
    assert mailward("query").stdout == "the cache is empty\n"
