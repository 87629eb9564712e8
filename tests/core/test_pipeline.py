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


class Boom(Check[None]):
    """A check with a bug."""

    name = "probe"
    stages = frozenset({Stage.EOM})

    def load(self, sec: Section) -> None:
        return None

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


class BrokenDkim(Check[None]):
    """A dkim check with a bug (as a library exception escaping dkimpy once was)."""

    name = "dkim"
    stages = frozenset({Stage.EOM})

    def load(self, sec: Section) -> None:
        return None

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
