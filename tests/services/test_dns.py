"""The DNS layer against a real DNS server on loopback."""

from __future__ import annotations

import threading
import time

import pytest
import spf

from mailward.lab.dns import Nameserver
from mailward.services.dns import (
    Budget,
    DnsError,
    DnsServFail,
    DnsSettings,
    DnsTimeout,
    Gate,
    Resolver,
    WouldWait,
    pyspf_lookup,
    spoil,
)
from mailward.services.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(ns: Nameserver, **kw: object) -> tuple[Resolver, Metrics, Clock]:
    """A resolver on the loopback server. By default its timeouts are long: an answer that
    is merely late on a busy machine must not become a timeout (or a retry, which the
    query counts would see); the tests about timeouts give their own short ones."""
    settings = DnsSettings(nameservers=(("127.0.0.1", ns.port),),
                           timeout=float(kw.pop("timeout", 2.0)),  # type: ignore[arg-type]
                           lifetime=float(kw.pop("lifetime", 4.0)),  # type: ignore[arg-type]
                           **kw)  # type: ignore[arg-type]
    metrics, clock = Metrics(), Clock()
    return Resolver(settings, metrics=metrics, clock=clock), metrics, clock


def count(metrics: Metrics, rtype: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(
        "mailward_dns_queries_total", {"rtype": rtype, "outcome": outcome}) or 0.0


def test_answers_and_joined_txt_strings(nameserver: Nameserver) -> None:
    nameserver.add("example.com", "TXT", '"v=spf1 " "ip4:192.0.2.0/24 -all"', '"other"')
    nameserver.add("example.com", "A", "192.0.2.1")
    nameserver.add("example.com", "MX", "10 mx.example.com.")
    r, _, _ = make(nameserver)
    assert sorted(r.txt("example.com")) == [b"other", b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert [a.address for a in r.query("EXAMPLE.com.", "A")] == ["192.0.2.1"]
    assert r.bind(Budget(30)).spf_lookup("example.com", "MX")[0][1][0] == 10


def test_positive_answers_are_cached_for_their_ttl(nameserver: Nameserver) -> None:
    nameserver.add("cached.example", "TXT", '"x"', ttl=60)
    r, metrics, clock = make(nameserver)
    for _ in range(5):
        assert r.txt("cached.example") == (b"x",)
    assert nameserver.count("cached.example", "TXT") == 1
    assert count(metrics, "TXT", "ok") == 1 and count(metrics, "TXT", "cached") == 4
    clock.now += 61
    r.txt("cached.example")
    assert nameserver.count("cached.example", "TXT") == 2


def test_an_answer_through_a_cname_is_cached_for_the_shortest_ttl_of_the_chain(
        nameserver: Nameserver) -> None:
    nameserver.load_zone("alias.example. 60 CNAME target.example.\n"
                         'target.example. 3600 TXT "x"\n'
                         "empty.example. 30 CNAME target.example.\n")
    r, _, clock = make(nameserver)
    assert r.txt("alias.example") == (b"x",)
    assert r.query("empty.example", "MX") == ()  # NODATA at the end of the chain
    clock.now += 31
    r.query("empty.example", "MX")
    assert nameserver.count("empty.example", "MX") == 2
    clock.now += 29
    r.txt("alias.example")  # the CNAME's 60 s have passed, not the TXT record's hour
    assert nameserver.count("alias.example", "TXT") == 2


def test_negative_answers_are_cached_for_the_soa_minimum(nameserver: Nameserver) -> None:
    nameserver.add("exists.example", "A", "192.0.2.1")
    r, metrics, clock = make(nameserver)
    assert r.txt("nope.example") == ()
    assert r.txt("exists.example") == ()  # NODATA
    assert r.txt("nope.example") == () and r.txt("exists.example") == ()
    assert nameserver.count("nope.example") == 1 and nameserver.count("exists.example") == 1
    assert count(metrics, "TXT", "nxdomain") == 1 and count(metrics, "TXT", "nodata") == 1
    clock.now += nameserver.negative_ttl + 1
    r.txt("nope.example")
    assert nameserver.count("nope.example") == 2


def test_timeout_is_an_error_within_the_lifetime_and_not_cached(nameserver: Nameserver) -> None:
    nameserver.drop.add("slow.example")
    r, metrics, _ = make(nameserver, timeout=0.2, lifetime=0.5)
    start = time.monotonic()
    with pytest.raises(DnsTimeout):
        r.txt("slow.example")
    assert time.monotonic() - start < 2.5  # the 0.5 s lifetime, not the 5 s default
    with pytest.raises(TimeoutError):  # DnsTimeout is a TimeoutError too
        r.txt("slow.example")
    assert count(metrics, "TXT", "timeout") == 2


def test_servfail(nameserver: Nameserver) -> None:
    nameserver.servfail.add("broken.example")
    r, metrics, _ = make(nameserver)
    with pytest.raises(DnsServFail):
        r.query("broken.example", "TXT")
    assert count(metrics, "TXT", "servfail") == 1


def test_truncated_udp_answers_are_retried_over_tcp(nameserver: Nameserver) -> None:
    big = " ".join(f'"{"k" * 200}{i}"' for i in range(6))
    nameserver.add("big.example", "TXT", big)
    r, _, _ = make(nameserver)
    (record,) = r.txt("big.example")
    assert len(record) > 1200
    transports = {t for q, _, t in nameserver.queries if q == "big.example."}
    assert transports == {"udp", "tcp"}


def test_cache_is_bounded(nameserver: Nameserver) -> None:
    for i in range(5):
        nameserver.add(f"n{i}.example", "TXT", f'"{i}"')
    r, _, _ = make(nameserver, cache_size=3)
    for i in range(5):
        r.txt(f"n{i}.example")
    r.txt("n0.example")  # evicted: asked again
    assert nameserver.count("n0.example") == 2
    r.txt("n4.example")  # still cached
    assert nameserver.count("n4.example") == 1


def test_max_ttl_caps_long_ttls(nameserver: Nameserver) -> None:
    nameserver.add("long.example", "TXT", '"x"', ttl=999999)
    r, _, clock = make(nameserver, max_ttl=100)
    r.txt("long.example")
    clock.now += 101
    r.txt("long.example")
    assert nameserver.count("long.example") == 2


# -- Memo: results computed from DNS answers, kept as long as those answers --------------------

def test_a_memo_keeps_a_result_until_the_first_answer_it_read_expires(
        nameserver: Nameserver) -> None:
    nameserver.add("short.example", "TXT", '"s"', ttl=60)
    nameserver.add("long.example", "TXT", '"l"', ttl=600)
    r, _, clock = make(nameserver)
    r.txt("long.example")  # already cached when the computation reads it: its expiry counts
    clock.now += 100
    with r.memo.tracing() as trace:
        value = r.txt("long.example") + r.txt("short.example")
    assert not trace.spoiled
    assert trace.expires == 1100 + 60  # the shorter of the two
    assert r.memo.put("k", value, trace)
    clock.now += 59
    assert r.memo.get("k") == (b"l", b"s")
    clock.now += 1
    assert r.memo.get("k") is None and len(r.memo) == 0


def test_a_memo_is_capped_by_max_ttl_and_bounded_in_size(nameserver: Nameserver) -> None:
    r, _, clock = make(nameserver, max_ttl=100, cache_size=2)
    for key in ("a", "b", "c"):
        with r.memo.tracing() as trace:
            pass  # read nothing: valid until max_ttl
        assert r.memo.put(key, key.upper(), trace)
    assert r.memo.get("a") is None and r.memo.get("c") == "C" and len(r.memo) == 2
    clock.now += 100
    assert r.memo.get("b") is None and r.memo.get("c") is None


def test_what_uses_a_kept_result_is_kept_no_longer_than_it(nameserver: Nameserver) -> None:
    nameserver.add("inner.example", "TXT", '"i"', ttl=60)
    nameserver.add("outer.example", "TXT", '"o"', ttl=600)
    nameserver.drop.add("slow.example")
    r, _, _ = make(nameserver, timeout=0.2, lifetime=0.4)

    def inner() -> tuple[bytes, ...]:
        hit: tuple[bytes, ...] | None = r.memo.get("inner")
        if hit is None:
            with r.memo.tracing() as trace:
                hit = r.txt("inner.example")
            r.memo.put("inner", hit, trace)
        return hit

    for _ in range(2):  # computed, then given by the memo: both tell the outer trace
        with r.memo.tracing() as outer:
            r.txt("outer.example")
            inner()
        assert outer.expires == 1000 + 60 and not outer.spoiled
    with r.memo.tracing() as outer:
        with r.memo.tracing():
            with pytest.raises(DnsTimeout):
                r.txt("slow.example")
    assert outer.spoiled


@pytest.mark.parametrize("how", ["timeout", "servfail", "would wait", "not cached", "spoil"])
def test_a_result_from_a_failed_or_uncached_lookup_is_not_kept(nameserver: Nameserver,
                                                               how: str) -> None:
    nameserver.add("ok.example", "TXT", '"ok"')
    nameserver.add("zero.example", "TXT", '"z"', ttl=0)
    nameserver.drop.add("slow.example")
    nameserver.servfail.add("broken.example")
    r, _, _ = make(nameserver, timeout=0.2, lifetime=0.4)
    name = {"timeout": "slow.example", "servfail": "broken.example", "would wait": "new.example",
            "not cached": "zero.example", "spoil": "ok.example"}[how]
    gate = Gate(inline=how == "would wait")
    with r.memo.tracing() as trace:
        r.txt("ok.example")
        try:
            r.txt(name, gate=gate)
        except (DnsError, WouldWait):
            pass  # a caller (pyspf) may swallow it: the trace still knows
        if how == "spoil":
            spoil()
    assert trace.spoiled
    assert not r.memo.put("k", 1, trace) and r.memo.get("k") is None


def test_the_spf_adapter_spoils_a_record_with_the_time_macro(nameserver: Nameserver) -> None:
    nameserver.add("t.example", "TXT", '"v=spf1 exists:%{" "T}.x.t.example -all"')
    nameserver.add("plain.example", "TXT", '"v=spf1 exists:%{i}.x.plain.example -all"')
    r, _, _ = make(nameserver)
    bound = r.bind(Budget(30))
    for name, spoiled in (("plain.example", False), ("t.example", True)):
        with r.memo.tracing() as trace:
            bound.spf_lookup(name, "TXT")
        assert trace.spoiled is spoiled, name


def test_spf_adapter_shape_and_temp_errors(nameserver: Nameserver) -> None:
    nameserver.add("spf.example", "TXT", '"v=spf1 " "-all"')
    nameserver.add("spf.example", "A", "192.0.2.7")
    nameserver.drop.add("dropped.example")
    r, _, _ = make(nameserver, timeout=0.2, lifetime=0.4)
    bound = r.bind(Budget(30))
    assert bound.spf_lookup("spf.example", "TXT") == [(("spf.example", "TXT"),
                                                      (b"v=spf1 ", b"-all"))]
    assert bound.spf_lookup("spf.example", "A") == [(("spf.example", "A"), "192.0.2.7")]
    with pytest.raises(spf.TempError):
        r.bind(Budget(30)).spf_lookup("dropped.example", "TXT")


def test_dkim_adapter(nameserver: Nameserver) -> None:
    nameserver.add("sel._domainkey.example.com", "TXT", '"v=DKIM1; k=rsa; " "p=ABC"')
    r, _, _ = make(nameserver)
    assert r.bind(Budget(30)).dkim_txt(b"sel._domainkey.example.com.") == b"v=DKIM1; k=rsa; p=ABC"
    assert r.bind(Budget(30)).dkim_txt(b"none._domainkey.example.com.") is None


def test_threads_share_one_cache(nameserver: Nameserver) -> None:
    nameserver.add("shared.example", "TXT", '"x"')
    r, _, _ = make(nameserver)
    r.txt("shared.example")
    results: list[tuple[bytes, ...]] = []
    threads = [threading.Thread(target=lambda: results.append(r.txt("shared.example")))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(b"x",)] * 20 and nameserver.count("shared.example") == 1


def test_garbage_answers_are_temporary_errors(nameserver: Nameserver) -> None:
    nameserver.garbage.add("junk.example")
    r, metrics, _ = make(nameserver, timeout=0.2, lifetime=0.5)
    start = time.monotonic()
    with pytest.raises(DnsError):
        r.txt("junk.example")
    assert time.monotonic() - start < 2.5  # the 0.5 s lifetime, not the 5 s default
    assert count(metrics, "TXT", "servfail") + count(metrics, "TXT", "timeout") == 1


def test_oversized_answers_arrive_over_tcp(nameserver: Nameserver) -> None:
    for i in range(150):
        nameserver.add("huge.example", "TXT", f'"{i:03d}{"x" * 250}"')
    r, _, _ = make(nameserver)
    records = r.txt("huge.example")
    assert len(records) == 150 and sum(map(len, records)) > 37_000


def test_a_message_budget_bounds_all_its_lookups_together(nameserver: Nameserver) -> None:
    """Each lookup answers within its lifetime, but together they outrun the budget.

    Three answers of 0.5 s fit in the 1.9 s budget with 0.4 s to spare for a busy machine;
    the 4th is given what is left, under 0.5 s, and times out however slow the machine is."""
    for i in range(6):
        nameserver.add(f"n{i}.example", "TXT", '"x"')
    nameserver.delay = 0.5
    r, metrics, _ = make(nameserver, timeout=2.0, lifetime=2.0)
    bound = r.bind(Budget(1.9))
    answered = 0
    start = time.perf_counter()
    with pytest.raises(DnsTimeout, match=r"budget|timeout"):
        for i in range(6):
            bound.txt(f"n{i}.example")
            answered += 1
    assert answered == 3
    with pytest.raises(DnsTimeout, match=r"budget of 1.9s for this message used up"):
        bound.txt("n5.example")  # nothing left: not even asked
    assert nameserver.count("n5.example") == 0
    assert count(metrics, "TXT", "budget") == 1
    assert time.perf_counter() - start < 2.9  # the budget and some slack; six answers take 3 s
    # cached answers cost nothing: a fresh budget of a few ms still gets them
    assert r.bind(Budget(0.001)).txt("n0.example") == (b"x",)


def test_without_a_budget_the_lifetime_alone_bounds_a_lookup(nameserver: Nameserver) -> None:
    nameserver.add("slow.example", "TXT", '"x"')
    nameserver.delay = 0.3
    r, _, _ = make(nameserver, timeout=1.0, lifetime=1.0)
    assert r.txt("slow.example") == (b"x",)


def test_pyspf_outside_a_transaction_never_uses_another_resolver() -> None:
    with pytest.raises(spf.TempError, match="no mailward resolver bound"):
        pyspf_lookup("example.com", "TXT")
