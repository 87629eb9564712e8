"""The spf check against a real DNS server on loopback, and the RFC 7208 test suite."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import pytest
import spf as pyspf
import yaml

from mailward.checks import spf
from mailward.core import pipeline, policy
from mailward.core.transaction import Stage
from mailward.core.verdict import Action, Result
from mailward.lab.dns import Nameserver
from mailward.services.dns import Budget, DnsSettings, Resolver, install_pyspf, pyspf_scope
from tests.conftest import make_config, make_tx, run_stage, snapshot_of

SUITE = Path(__file__).resolve().parents[1] / "data" / "spf" / "rfc7208-tests.yml"


def resolver_for(ns: Nameserver, *, lifetime: float = 1.0) -> Resolver:
    # 1 s: an answer late on a busy machine (loopback answers took up to 0.9 s once under
    # load) must not become a temperror; the dropped names cost that second each
    r = Resolver(DnsSettings(nameservers=(("127.0.0.1", ns.port),), timeout=lifetime / 2,
                             lifetime=lifetime))
    return r


@pytest.fixture
def resolver(nameserver: Nameserver) -> Resolver:
    return resolver_for(nameserver)


def run(text: str, resolver: Resolver | None, stage: Stage = Stage.EOM, **tx: Any) -> Any:
    cfg = make_config("[policy]\nchecks = spf, authres\n" + text)
    tx.setdefault("client_ip", "192.0.2.10")
    tx.setdefault("helo", "mail.example.com")
    tx.setdefault("mail_from", "alice@example.com")
    _, results = run_stage(cfg, stage, make_tx(stage=stage, **tx), resolver=resolver)
    return results[0], policy.decide(results, cfg.policy, final=stage is Stage.EOM)


ZONE = """
example.com.          TXT "v=spf1 ip4:192.0.2.0/24 include:_spf.example.net -all"
_spf.example.net.     TXT "v=spf1 ip4:198.51.100.0/24 ~all"
mail.example.com.     TXT "v=spf1 a -all"
mail.example.com.     A   192.0.2.10
neutral.example.      TXT "v=spf1 ?all"
soft.example.         TXT "v=spf1 ~all"
broken.example.       TXT "v=spf1 ip4:not-an-ip -all"
two.example.          TXT "v=spf1 -all"
two.example.          TXT "v=spf1 +all"
loop.example.         TXT "v=spf1 include:loop.example -all"
many.example.         TXT "v=spf1 {MANY} -all"
timeout.example.      TXT "v=spf1 a:dropped.example -all"
""".replace("{MANY}", " ".join(f"a:a{i}.many.example" for i in range(11)))


@pytest.mark.parametrize(("ip", "mail_from", "expected"), [
    ("192.0.2.10", "alice@example.com", Result.PASS),
    ("198.51.100.5", "alice@example.com", Result.PASS),  # via include (§5.2)
    ("203.0.113.1", "bob@soft.example", Result.SOFTFAIL),
    ("203.0.113.1", "alice@example.com", Result.FAIL),
    ("203.0.113.1", "bob@neutral.example", Result.NEUTRAL),
    ("203.0.113.1", "bob@nospf.example", Result.NONE),
    ("203.0.113.1", "bob@broken.example", Result.PERMERROR),
    ("203.0.113.1", "bob@two.example", Result.PERMERROR),  # two records (RFC 7208 §4.5)
    ("203.0.113.1", "bob@loop.example", Result.PERMERROR),
    ("203.0.113.1", "bob@many.example", Result.PERMERROR),  # > 10 lookups (§4.6.4)
    ("203.0.113.1", "bob@timeout.example", Result.TEMPERROR),
    ("::ffff:192.0.2.10", "alice@example.com", Result.PASS),
])
def test_each_result(nameserver: Nameserver, resolver: Resolver, ip: str, mail_from: str,
                     expected: Result) -> None:
    nameserver.load_zone(ZONE)
    nameserver.drop.add("dropped.example")
    result, verdict = run("", resolver, client_ip=ip, mail_from=mail_from)
    assert result.result is expected
    assert verdict.action is Action.ACCEPT  # SPF alone decides nothing by default
    ar = [e for e in result.authres if ("smtp", "mailfrom", mail_from) in e.properties]
    assert ar and ar[0].result is expected


def test_helo_identity_and_null_sender(nameserver: Nameserver, resolver: Resolver) -> None:
    nameserver.load_zone(ZONE)
    result, _ = run("", resolver, mail_from="alice@example.com")
    assert [(e.result, e.properties) for e in result.authres] == [
        (Result.PASS, (("smtp", "helo", "mail.example.com"),)),
        (Result.PASS, (("smtp", "mailfrom", "alice@example.com"),)),
    ]
    bounce, _ = run("", resolver, client_ip="203.0.113.1", mail_from="")
    assert bounce.result is Result.FAIL  # the HELO result stands for <> (RFC 7208 §2.4)
    assert [e.properties for e in bounce.authres] == [(("smtp", "helo", "mail.example.com"),)]
    literal, _ = run("[check.spf]\ncheck_helo = no\n", resolver, helo="[192.0.2.10]")
    assert [e.properties[0][1] for e in literal.authres] == ["mailfrom"]


def test_actions_refuse_at_mail_from(nameserver: Nameserver, resolver: Resolver) -> None:
    nameserver.load_zone(ZONE)
    nameserver.drop.add("dropped.example")
    cfg = "[check.spf]\non_fail = reject\non_temperror = tempfail\n"
    _, verdict = run(cfg, resolver, stage=Stage.MAIL, client_ip="203.0.113.1")
    assert (verdict.action, str(verdict.reply)) == (Action.REJECT,
                                                    "550 5.7.23 SPF validation failed")
    _, verdict = run(cfg, resolver, stage=Stage.MAIL, client_ip="203.0.113.1",
                     mail_from="bob@timeout.example")
    assert (verdict.action, str(verdict.reply)) == (
        Action.TEMPFAIL, "451 4.7.24 SPF check failed temporarily, try again later")


def test_default_settings_evaluate_once(nameserver: Nameserver, resolver: Resolver) -> None:
    nameserver.load_zone(ZONE)
    result, _ = run("", resolver, stage=Stage.MAIL)
    assert result.result is Result.NONE and nameserver.queries == []  # nothing can refuse
    refusing, _ = run("[check.spf]\non_fail = reject\n", resolver, stage=Stage.MAIL)
    assert refusing.result is Result.PASS


def test_outbound_is_never_judged(nameserver: Nameserver, resolver: Resolver) -> None:
    nameserver.load_zone(ZONE)
    result, _ = run("[check.spf]\non_fail = reject\n", resolver, client_ip="203.0.113.1",
                    auth_user="alice")
    assert (result.result, result.authres) == (Result.NONE, ())
    assert nameserver.queries == []


def test_unbound_pyspf_is_an_error_not_a_silent_system_lookup(nameserver: Nameserver) -> None:
    snap = snapshot_of(make_config("[policy]\nchecks = spf, authres\n"),
                       resolver=resolver_for(nameserver))  # building it binds pyspf
    saved = pyspf.DNSLookup
    try:
        pyspf.DNSLookup = lambda *a, **k: pytest.fail("pyspf used its own DNS")
        tx = make_tx(client_ip="192.0.2.10", helo="mail.example.com",
                     mail_from="alice@example.com")
        _, verdict = pipeline.evaluate(Stage.EOM, tx, snap)
        assert verdict.results[0].result is Result.TEMPERROR
        assert verdict.action is Action.TEMPFAIL
        assert nameserver.queries == []
    finally:
        pyspf.DNSLookup = saved


def test_warm_cache_costs_no_queries(nameserver: Nameserver, resolver: Resolver) -> None:
    nameserver.load_zone(ZONE)
    run("", resolver, client_ip="198.51.100.5")
    before = len(nameserver.queries)
    for _ in range(10):
        result, _ = run("", resolver, client_ip="198.51.100.5")
        assert result.result is Result.PASS
    assert len(nameserver.queries) == before


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(ip, sender) of each evaluation pyspf was asked for."""
    done: list[tuple[str, str]] = []
    real = spf._evaluate

    def counted(**kw: Any) -> tuple[Result, str]:
        done.append((kw["ip"], kw["sender"]))
        return real(**kw)

    monkeypatch.setattr(spf, "_evaluate", counted)
    return done


def test_a_result_is_kept_as_long_as_the_records_it_read(
        nameserver: Nameserver, evaluations: list[tuple[str, str]]) -> None:
    nameserver.load_zone(ZONE)  # TTL 300 for every record
    clock = Clock()
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", nameserver.port),), timeout=0.5,
                                    lifetime=1.0), clock=clock)
    first, _ = run("", resolver)
    assert first.result is Result.PASS and len(evaluations) == 2  # HELO and MAIL FROM
    queries = len(nameserver.queries)
    clock.now += 299
    again, _ = run("", resolver)
    assert again.result is Result.PASS and again.authres == first.authres
    assert len(evaluations) == 2 and len(nameserver.queries) == queries
    other, _ = run("", resolver, client_ip="203.0.113.1")  # another IP: its own evaluation
    assert other.result is Result.FAIL and len(evaluations) == 4
    nameserver.clear()
    nameserver.load_zone(ZONE.replace("ip4:192.0.2.0/24 ", ""))
    clock.now += 1  # example.com's TXT record has expired: so has the result
    changed, _ = run("", resolver)
    assert changed.result is Result.FAIL and evaluations[-1] == ("192.0.2.10",
                                                                 "alice@example.com")


def test_a_temperror_a_time_macro_or_a_long_explanation_is_not_kept(
        nameserver: Nameserver, resolver: Resolver, evaluations: list[tuple[str, str]]) -> None:
    # %{t} may only be in an explanation (RFC 7208 §7.3), which is part of a fail result
    nameserver.load_zone(ZONE + 'clock.example. TXT "v=spf1 -all exp=why.clock.example"\n'
                         'why.clock.example. TXT "refused at %{t}"\n'
                         'long.example. TXT "v=spf1 -all exp=why.long.example"\n'
                         f'why.long.example. TXT "{"x" * 250}" "{"y" * 250}" "{"z" * 100}"\n')
    nameserver.drop.add("dropped.example")
    for sender, expected in (("bob@timeout.example", Result.TEMPERROR),
                             ("bob@clock.example", Result.FAIL),
                             ("bob@long.example", Result.FAIL)):  # 600 characters: not kept
        for _ in range(2):
            result, _ = run("[check.spf]\ncheck_helo = no\n", resolver, mail_from=sender)
            assert result.result is expected
        assert evaluations.count(("192.0.2.10", sender)) == 2  # evaluated again
    assert len(resolver.memo) == 0


def test_an_evaluation_that_ran_out_of_time_is_not_kept(nameserver: Nameserver,
                                                        resolver: Resolver) -> None:
    # pyspf refuses a lookup itself once its querytime is spent (a budget nearly used up, a
    # slow zone) and raises TempError, which its bare except around exp= swallows: the fail
    # came with the default explanation instead of the sender's, and no lookup spoiled it
    nameserver.load_zone('hurry.example. TXT "v=spf1 -all exp=why.hurry.example"\n'
                         'why.hurry.example. TXT "%{s} may not send from %{i}"\n')
    install_pyspf()
    args = {"ip": "203.0.113.1", "sender": "bob@hurry.example", "helo": "mx.hurry.example"}
    with pyspf_scope(resolver.bind(Budget(30))):
        hurried = spf.evaluate(**args, timeout=1e-9, memo=resolver.memo)
        assert hurried == (Result.FAIL, "SPF fail - not authorized")
        assert len(resolver.memo) == 0
        assert spf.evaluate(**args, timeout=5, memo=resolver.memo) == (
            Result.FAIL, "bob@hurry.example may not send from 203.0.113.1")


# -- the RFC 7208 test suite ------------------------------------------------------------------

# Cases where mailward's result differs from the suite, with the reason. Empty means: all pass.
KNOWN_DIVERGENCES: dict[str, str] = {}


def _rdata(rtype: str, value: Any) -> dns.rdata.Rdata:
    if rtype in ("TXT", "SPF"):
        strings = [value] if isinstance(value, str) else list(value)
        cls = dns.rdtypes.ANY.TXT.TXT if rtype == "TXT" else dns.rdtypes.ANY.SPF.SPF
        return cls(dns.rdataclass.IN, dns.rdatatype.from_text(rtype),
                   [s.encode("utf-8") for s in strings])
    if rtype == "MX":
        value = f"{value[0]} {value[1]}."
    elif rtype in ("PTR", "CNAME"):
        value = f"{value}."
    return dns.rdata.from_text("IN", rtype, str(value))


def load_scenario(ns: Nameserver, zonedata: dict[str, list[Any]]) -> None:
    """Serve a scenario's zone as pyspf's own test driver reads it: SPF records are served
    as TXT too unless the name lists TXT (`TXT: NONE` means none), and TIMEOUT makes every
    query for a type the name does not list time out."""
    for name, records in zonedata.items():
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        try:
            for record in records:
                if record == "TIMEOUT":
                    ns.drop_missing.add(name.lower().rstrip("."))
                    continue
                for rtype, value in record.items():
                    if value == "NONE":
                        continue
                    ns.add_rdata(name, _rdata(rtype, value))
                    if rtype == "SPF" and not has_txt:
                        ns.add_rdata(name, _rdata("TXT", value))
        except Exception:  # noqa: S112 - a name DNS cannot carry (label > 63) is never served
            continue


def suite_cases() -> Iterator[Any]:
    with open(SUITE, encoding="utf-8") as fh:
        for scenario in yaml.safe_load_all(fh):
            for name, test in scenario["tests"].items():
                expected = test["result"]
                yield pytest.param(scenario["zonedata"], test,
                                   expected if isinstance(expected, list) else [expected],
                                   id=name)


@pytest.mark.parametrize(("zonedata", "test", "expected"), list(suite_cases()))
def test_rfc7208_suite(nameserver: Nameserver, zonedata: dict[str, list[Any]],
                       test: dict[str, Any], expected: list[str], request: Any) -> None:
    load_scenario(nameserver, zonedata)
    install_pyspf()
    resolver = resolver_for(nameserver)
    with pyspf_scope(resolver.bind(Budget(30))):
        result, why = spf.evaluate(ip=test["host"], sender=test["mailfrom"],
                                   helo=test["helo"], timeout=5, memo=resolver.memo)
        queries = len(nameserver.queries)
        kept = spf.evaluate(ip=test["host"], sender=test["mailfrom"], helo=test["helo"],
                            timeout=5, memo=resolver.memo)
    # the result given again by the memo is the result; what the memo keeps, it asks no more
    assert kept == (result, why)
    if len(resolver.memo):
        assert len(nameserver.queries) == queries
    case = request.node.callspec.id
    if case in KNOWN_DIVERGENCES:
        assert str(result) not in expected, f"{case} passes now: drop it from the list"
        return
    assert str(result) in expected, f"{case}: got {result} ({why}), suite says {expected}"


def test_suite_is_all_there() -> None:
    assert len(list(suite_cases())) > 200
    assert dataclasses.is_dataclass(spf.Settings)
