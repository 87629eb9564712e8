"""What a message contributes to an aggregate report: the disposition actually applied, and
why it differs from the policy (RFC 9990 §2.1 `reason`), from the final verdict."""

from __future__ import annotations

import ipaddress

import pytest

from mailward.core.outcomes import (
    DkimOutcome,
    DkimSignature,
    DmarcOutcome,
    SpfIdentity,
    SpfOutcome,
    SpfScope,
)
from mailward.core.reporting import message_record
from mailward.core.transaction import Stage, Transaction
from mailward.core.verdict import Action, CheckResult, Result, Verdict

TX = Transaction(Stage.EOM, client_ip=ipaddress.ip_address("192.0.2.7"),
                 mail_from="b@Bounce.Example.ORG")
POLICY = (("p", "reject"), ("testing", "n"), ("rua", "mailto:d@example.org"))


def verdict(dmarc: DmarcOutcome, action: Action = Action.ACCEPT, *, decided_by: str = "",
            would: Action | None = None) -> Verdict:
    results = (
        CheckResult("spf", Result.PASS, outcome=SpfOutcome((SpfIdentity(
            SpfScope.MAILFROM, "b@bounce.example.org", "bounce.example.org", Result.PASS),))),
        CheckResult("dkim", Result.PASS, outcome=DkimOutcome((
            DkimSignature(Result.PASS, domain="example.org", selector="s1"),
            DkimSignature(Result.FAIL, reason="bad", domain="x.example", selector="k")))),
        CheckResult("dmarc", dmarc.result, would=would, outcome=dmarc))
    return Verdict(action, results=results, decided_by=decided_by)


def outcome(result: Result = Result.FAIL, applied: str = "reject", **kw: object) -> DmarcOutcome:
    values: dict[str, object] = dict(author_domain="example.org", policy_domain="example.org",
                                     published="p=reject", applied=applied, record=POLICY)
    values.update(kw)
    return DmarcOutcome(result, **values)  # type: ignore[arg-type]


def test_a_pass() -> None:
    row = message_record(TX, verdict(outcome(Result.PASS, aligned=("dkim:example.org",))), 5)
    assert row is not None
    assert (row.time, row.source_ip, row.envelope_from, row.disposition, row.dkim_aligned,
            row.spf_aligned, row.reasons) == (5, "192.0.2.7", "bounce.example.org", "pass",
                                              "pass", "fail", ())
    assert row.dkim == (("example.org", "s1", "pass"), ("x.example", "k", "fail"))
    assert row.spf == ("bounce.example.org", "mailfrom", "pass")
    assert row.policy == POLICY


@pytest.mark.parametrize(("dmarc", "action", "decided_by", "would", "expected"), [
    (outcome(), Action.REJECT, "dmarc", None, ("reject", ())),
    # never_reject or reject_as: quarantined instead
    (outcome(), Action.QUARANTINE, "dmarc", None,
     ("quarantine", (("local_policy", "policy asked reject, applied quarantine"),))),
    # monitor mode: accepted, and says what it would have done
    (outcome(), Action.ACCEPT, "", Action.REJECT,
     ("none", (("local_policy", "monitor mode: would reject"),))),
    # a trusted ARC sealer vouched: accepted as a trusted forwarder
    (outcome(applied="none", arc_override="lists.example"), Action.ACCEPT, "", None,
     ("none", (("trusted_forwarder", "ARC sealed by lists.example"),))),
    # t=y: the policy's testing mode lowered it
    (outcome(applied="quarantine", published="p=reject t=y",
             record=(("p", "reject"), ("testing", "y"))), Action.QUARANTINE, "dmarc", None,
     ("quarantine", (("policy_test_mode", "published p=reject t=y"),))),
    # DMARC passed, another check refused
    (outcome(Result.PASS, aligned=("spf:example.org",)), Action.REJECT, "ratelimit", None,
     ("reject", (("local_policy", "reject by ratelimit"),))),
])
def test_dispositions_and_reasons(dmarc: DmarcOutcome, action: Action, decided_by: str,
                                  would: Action | None, expected: tuple[str, object]) -> None:
    row = message_record(TX, verdict(dmarc, action, decided_by=decided_by, would=would), 1)
    assert row is not None
    assert (row.disposition, row.reasons) == expected


@pytest.mark.parametrize("dmarc", [
    outcome(Result.NONE, policy_domain=""), outcome(Result.TEMPERROR),
    outcome(Result.PERMERROR, policy_domain=""),
])
def test_nothing_to_report(dmarc: DmarcOutcome) -> None:
    assert message_record(TX, verdict(dmarc), 1) is None


def test_a_tempfail_is_not_counted_the_retry_will_be() -> None:
    assert message_record(TX, verdict(outcome(), Action.TEMPFAIL, decided_by="dkim"), 1) is None


def test_what_a_message_says_that_names_no_domain_is_left_out() -> None:
    v = verdict(outcome(Result.PASS, aligned=("dkim:example.org",)))
    dkim = v.results[1]
    assert isinstance(dkim.outcome, DkimOutcome)
    odd = DkimOutcome((*dkim.outcome.signatures,
                       DkimSignature(Result.FAIL, domain="exa!mple", selector="x")))
    v = Verdict(v.action, results=(v.results[0], CheckResult("dkim", Result.PASS, outcome=odd),
                                   v.results[2]))
    row = message_record(TX, v, 1)
    assert row is not None and [d for d, _, _ in row.dkim] == ["example.org", "x.example"]


def test_mail_from_no_smtp_client_is_not_reported() -> None:
    local = Transaction(Stage.EOM, mail_from="root@example.org")
    assert message_record(local, verdict(outcome()), 1) is None


def test_an_envelope_domain_that_is_no_domain_is_left_out() -> None:
    odd = Transaction(Stage.EOM, client_ip=ipaddress.ip_address("192.0.2.7"),
                      mail_from="b@x\udcff.example")
    row = message_record(odd, verdict(outcome(Result.PASS, aligned=("dkim:example.org",))), 1)
    assert row is not None and row.envelope_from == ""


def test_a_hostile_record_or_message_cannot_bloat_every_row() -> None:
    many = DkimOutcome(tuple(DkimSignature(Result.FAIL, domain=f"d{i}.example", selector="s" * 5000)
                             for i in range(300)))
    v = verdict(outcome(Result.PASS, aligned=("dkim:example.org",)))
    v = Verdict(v.action, results=(v.results[0], CheckResult("dkim", Result.FAIL, outcome=many),
                                   v.results[2]))
    row = message_record(TX, v, 1)
    assert row is not None and len(row.dkim) == 16 and {len(s) for _, s, _ in row.dkim} == {64}
