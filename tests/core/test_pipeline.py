"""The core entry point: direction, stages, containment of errors, monitor mode."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mailward.core import pipeline, policy
from mailward.core.check import Check, Context, Link
from mailward.core.ini import Section
from mailward.core.settings import Mode
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import Action, AddHeader, CheckResult, DeleteHeader, Result
from mailward.lab.dns import Nameserver
from tests.conftest import make_config, make_tx, run_stage, snapshot_of


def test_direction_classification() -> None:
    cfg = make_config("[milter]\ntrusted_networks = 10.0.0.0/8\nlocal_domains = example.com\n"
                      "originating_daemons = ORIGINATING\n")
    classify = pipeline.classify
    assert classify(make_tx(), cfg) is Direction.INBOUND
    assert classify(make_tx(client_ip="10.0.0.1"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(client_ip="::ffff:10.0.0.1"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(daemon_name="ORIGINATING"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(auth_user="u", recipients=("a@example.com",)),
                    cfg) is Direction.INTERNAL
    assert classify(make_tx(auth_user="u", recipients=("a@example.com", "b@else.example")),
                    cfg) is Direction.OUTBOUND
    assert classify(make_tx(client_ip=""), cfg) is Direction.INBOUND


class Bare(Check[None]):
    """A test check without settings: subclasses set name, stages and run."""

    stages = frozenset({Stage.EOM})

    def load(self, sec: Section) -> None:
        return None


class Boom(Bare):
    """A check with a bug."""

    name = "probe"

    def run(self, tx: Transaction, ctx: Context, settings: None) -> CheckResult:
        raise KeyError("bug")


def test_exception_in_check_becomes_temperror_tempfail() -> None:
    cfg = make_config()
    link: Link[None] = Link(Boom(), None, Mode.ENFORCE, Action.TEMPFAIL)
    cfg = dataclasses.replace(cfg, chain=(link, *cfg.chain))
    _, results = run_stage(cfg, Stage.EOM, make_tx())
    assert (results[0].result, results[0].action) == (Result.TEMPERROR, Action.TEMPFAIL)
    v = policy.decide(results, cfg.policy)
    assert (v.action, str(v.reply)) == (
        Action.TEMPFAIL, "451 4.7.0 Temporary failure in message checks, try again later")
    # fail open when so configured
    cfg = dataclasses.replace(cfg, chain=(dataclasses.replace(link, on_error=Action.ACCEPT),))
    _, results = run_stage(cfg, Stage.EOM, make_tx())
    assert policy.decide(results, cfg.policy).action is Action.ACCEPT


def test_monitor_mode_records_instead_of_acting() -> None:
    cfg = make_config("[milter]\nmode = monitor\n[check.tls]\nrequire_inbound = yes\n")
    _, results = run_stage(cfg, Stage.MAIL, make_tx(stage=Stage.MAIL))
    tls = results[0]
    assert (tls.result, tls.action, tls.would, tls.reply) == (
        Result.FAIL, Action.ACCEPT, Action.REJECT, None)
    _, results = run_stage(cfg, Stage.EOM, make_tx(headers=[("Bcc", " x@y")]))
    v = policy.decide(results, cfg.policy)
    assert v.action is Action.ACCEPT
    assert [type(e).__name__ for e in v.edits] == ["AddHeader"]  # only our A-R: Bcc stays
    assert {x.check: x.would for x in results}["bcc"] is Action.ACCEPT


def test_monitor_mode_still_deletes_forged_results_and_adds_ours() -> None:
    """Deleting fields that claim our authserv-id protects readers: not a policy action."""
    for mode in ("[milter]\nauthserv_id = mx.example.com\nmode = monitor\n",
                 "[check.authres]\nmode = monitor\n"):
        cfg = make_config(mode)
        tx = make_tx(headers=[("Authentication-Results", " mx.example.com; dmarc=pass"),
                              ("From", " a@b.example")])
        _, verdict = pipeline.evaluate(Stage.EOM, tx, snapshot_of(cfg))
        assert verdict.edits[0] == DeleteHeader("Authentication-Results", 1), mode
        added = verdict.edits[-1]
        assert isinstance(added, AddHeader) and added.value.startswith("mx.example.com;")


def test_only_checks_of_the_stage_run() -> None:
    cfg = make_config()
    _, results = run_stage(cfg, Stage.MAIL, make_tx(stage=Stage.MAIL))
    assert [x.check for x in results] == ["tls"]
    _, results = run_stage(cfg, Stage.EOM, make_tx())
    assert [x.check for x in results] == ["tls", "bcc", "trace", "authres"]


BUDGET_ZONE = """
deep.a.b.c.d.slow.example. A   192.0.2.1
slow.example.              TXT "v=spf1 include:i1.slow.example include:i2.slow.example -all"
i1.slow.example.           TXT "v=spf1 include:i3.slow.example ?all"
i2.slow.example.           TXT "v=spf1 ip4:192.0.2.0/24 ?all"
i3.slow.example.           TXT "v=spf1 ?all"
"""


def budget_config(nameserver: Nameserver, budget: float) -> Snapshot:
    return snapshot_of(make_config(
        f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\ntimeout = 1\nlifetime = 1\n"
        f"budget = {budget}\n[policy]\nchecks = spf, dkim, dmarc, authres\n"))


@pytest.mark.parametrize(("budget", "result"), [(1, Result.TEMPERROR), (20, Result.NONE)])
def test_the_dns_budget_bounds_a_dmarc_tree_walk(nameserver: Nameserver, budget: float,
                                                 result: Result) -> None:
    """Each lookup answers in 0.25 s, well within its lifetime; the walk's 7 lookups plus the
    DKIM/SPF none do not fit in a 1 s budget: temperror (451), and quickly."""
    nameserver.load_zone(BUDGET_ZONE)
    nameserver.delay = 0.25
    tx = make_tx(headers=[("From", " x@deep.a.b.c.d.slow.example")], mail_from="", helo="")
    start = time.perf_counter()
    _, verdict = pipeline.evaluate(Stage.EOM, tx, budget_config(nameserver, budget))
    elapsed = time.perf_counter() - start
    dmarc = {r.check: r for r in verdict.results}["dmarc"]
    assert dmarc.result is result, dmarc.reason
    if result is Result.TEMPERROR:
        assert "budget" in dmarc.reason or "timeout" in dmarc.reason
        assert (verdict.action, verdict.reply.code if verdict.reply else 0) == (
            Action.TEMPFAIL, 451)
        assert elapsed < 1.5
    else:
        assert elapsed > 1.5  # the same walk, given the time, completes


def test_the_dns_budget_is_shared_by_spf_and_its_includes(nameserver: Nameserver) -> None:
    nameserver.load_zone(BUDGET_ZONE)
    nameserver.delay = 0.3
    tx = make_tx(headers=[("From", " a@slow.example")], mail_from="a@slow.example",
                 helo="", client_ip="198.51.100.7")
    snap = budget_config(nameserver, 1)
    _, verdict = pipeline.evaluate(Stage.EOM, tx, snap)
    spf = {r.check: r for r in verdict.results}["spf"]
    assert spf.result is Result.TEMPERROR, spf.reason
    # and a budget is per message: the next message starts afresh (and finds a warm cache)
    nameserver.delay = 0.0
    _, verdict = pipeline.evaluate(Stage.EOM, tx, snap)
    assert {r.check: r for r in verdict.results}["spf"].result is Result.FAIL


class BrokenDkim(Bare):
    """A dkim check with a bug (as a library exception escaping dkimpy once was)."""

    name = "dkim"

    def run(self, tx: Transaction, ctx: Context, settings: None) -> CheckResult:
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")


def test_an_internal_error_never_becomes_a_permanent_reject(nameserver: Nameserver) -> None:
    """DMARC without the DKIM result would fail a p=reject domain: 451, never 550."""
    nameserver.load_zone('bank.example. TXT "v=spf1 -all"\n'
                         '_dmarc.bank.example. TXT "v=DMARC1; p=reject"\n')
    cfg = make_config(f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
                      "[policy]\nchecks = spf, dkim, dmarc, authres\n")
    tx = make_tx(headers=[("From", " ceo@bank.example")], mail_from="ceo@bank.example",
                 client_ip="198.51.100.7")
    _, verdict = pipeline.evaluate(Stage.EOM, tx, snapshot_of(cfg))
    assert (verdict.action, str(verdict.reply)) == (Action.REJECT, "550 5.7.1 Rejected by the "
                                                    "DMARC policy of the sender domain "
                                                    "bank.example (p=reject)")
    chain = tuple(dataclasses.replace(li, check=BrokenDkim()) if li.name == "dkim" else li
                  for li in cfg.chain)
    broken = dataclasses.replace(cfg, chain=chain)
    _, verdict = pipeline.evaluate(Stage.EOM, tx, snapshot_of(broken))
    results = {r.check: r for r in verdict.results}
    assert results["dkim"].internal_error and results["dmarc"].action is Action.TEMPFAIL
    assert "dkim failed internally" in results["dmarc"].reason
    assert (verdict.action, verdict.reply.code if verdict.reply else 0) == (Action.TEMPFAIL, 451)


# -- Run: inline on cached answers, the rest where waiting is allowed (the asyncio engine) ----

INLINE_ZONE = """
bank.example.         TXT "v=spf1 ip4:198.51.100.7 -all"
_dmarc.bank.example.  TXT "v=DMARC1; p=reject"
"""


def inline_snapshot(nameserver: Nameserver, extra: str = "") -> Snapshot:
    nameserver.load_zone(INLINE_ZONE)
    return snapshot_of(make_config(
        f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
        f"[policy]\nchecks = spf, dkim, dmarc, ratelimit, authres\n"
        f"[check.ratelimit]\nlimits = inbound domain messages 100\n{extra}"))


def bank_tx(stage: Stage = Stage.EOM) -> Transaction:
    return make_tx(stage=stage, headers=[("From", " ceo@bank.example")],
                   mail_from="ceo@bank.example", client_ip="198.51.100.7")


def test_an_inline_run_stops_at_the_first_lookup_the_cache_cannot_answer(
        nameserver: Nameserver) -> None:
    snap = inline_snapshot(nameserver)
    run = pipeline.Run(Stage.EOM, bank_tx(), snap)
    assert not run.advance(inline=True)
    assert [r.check for r in run.results] == [] and run.waits == 1  # spf asked for DNS
    assert nameserver.queries == []  # ... and nothing was asked
    assert run.advance()  # where waiting is allowed, from spf on
    tx, verdict = run.verdict()
    assert {r.check: r.result for r in verdict.results}["dmarc"] is Result.PASS
    assert (tx, verdict) == pipeline.evaluate(Stage.EOM, bank_tx(), snap)
    # the cache is warm now: the whole stage runs inline, and asks nothing
    asked = len(nameserver.queries)
    again = pipeline.Run(Stage.EOM, bank_tx(), snap)
    assert again.advance(inline=True) and again.waits == 0
    assert again.verdict()[1] == verdict and len(nameserver.queries) == asked


def test_an_inline_run_goes_on_from_the_check_that_would_wait(nameserver: Nameserver) -> None:
    """spf's answers are cached, dmarc's are not: spf's result is kept, dmarc runs once."""
    snap = inline_snapshot(nameserver)
    other = dataclasses.replace(bank_tx(), headers=make_tx(
        headers=[("From", " x@other.example")]).headers)
    pipeline.evaluate(Stage.EOM, other, snap)  # spf's lookups for bank.example, cached
    seen: list[str] = []
    run = pipeline.Run(Stage.EOM, bank_tx(), snap,
                       observe=lambda name, _r, _s: seen.append(name))
    assert not run.advance(inline=True)
    assert [r.check for r in run.results] == ["spf", "dkim"]
    assert run.advance()
    assert seen == ["spf", "dkim", "dmarc", "authres"]  # each observed (timed) once


class Swallower(Bare):
    """A check whose library catches everything, as pyspf's bare `except:` would."""

    name = "dkim"

    def run(self, tx: Transaction, ctx: Context, settings: None) -> CheckResult:
        author = tx.headers[0].value.strip().partition("@")[2]
        try:
            ctx.dns.txt(f"_swallowed.{author}")
        except BaseException:
            return CheckResult(self.name, Result.TEMPERROR, action=Action.TEMPFAIL)
        return CheckResult(self.name, Result.PASS)


def test_a_refused_lookup_stops_the_run_even_when_a_library_swallows_it(
        nameserver: Nameserver) -> None:
    snap = inline_snapshot(nameserver)
    cfg = snap.config
    chain = tuple(dataclasses.replace(li, check=Swallower()) if li.name == "dkim" else li
                  for li in cfg.chain)
    snap = snapshot_of(dataclasses.replace(cfg, chain=chain))
    other = dataclasses.replace(bank_tx(), headers=make_tx(
        headers=[("From", " x@other.example")]).headers)
    pipeline.evaluate(Stage.EOM, other, snap)  # spf's lookups, cached
    run = pipeline.Run(Stage.EOM, bank_tx(), snap)
    assert not run.advance(inline=True)
    assert [r.check for r in run.results] == ["spf"]  # the swallowed temperror is not kept
    assert run.advance()
    assert {r.check: r.result for r in run.results}["dkim"] is Result.PASS


def test_a_rate_limit_store_in_another_process_is_never_asked_inline(
        nameserver: Nameserver) -> None:
    snap = inline_snapshot(nameserver, "backend = redis\nredis_url = redis://127.0.0.1:1\n"
                                       "timeout = 0.1\n")
    run = pipeline.Run(Stage.RCPT, bank_tx(Stage.RCPT), snap)
    assert not run.advance(inline=True) and run.results == []
    # the memory store is asked inline; a run that stops after it counts the message once
    snap = inline_snapshot(nameserver)
    cfg = snap.config
    links = {li.name: li for li in cfg.chain}
    asker = dataclasses.replace(links["dkim"], check=Asker())
    snap = snapshot_of(dataclasses.replace(cfg, chain=(links["ratelimit"], asker)))
    for count in (1, 2):
        run = pipeline.Run(Stage.MAIL, bank_tx(Stage.MAIL), snap)
        assert not run.advance(inline=True)
        assert [r.check for r in run.results] == ["ratelimit"]
        assert run.advance()
        assert snap.rates.add(["inbound:domain:messages:bank.example"], 0, 3600) == [count]


class Asker(Bare):
    """A check at MAIL that looks something up, a new name each time."""

    name = "dkim"
    stages = frozenset({Stage.MAIL})
    asked = 0

    def run(self, tx: Transaction, ctx: Context, settings: None) -> CheckResult:
        Asker.asked += 1
        ctx.dns.txt(f"n{Asker.asked}.bank.example")
        return CheckResult(self.name, Result.PASS)
