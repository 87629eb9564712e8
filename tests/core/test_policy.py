"""Policy: severity, replies, merged edits."""

from __future__ import annotations

import dataclasses

from mailward.core import policy
from mailward.core.transaction import Direction, Header
from mailward.core.verdict import (
    Action,
    AddHeader,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    Quarantine,
    Reply,
    Result,
    Verdict,
)
from tests.conftest import make_config

POLICY = make_config().policy


def r(check: str, action: Action = Action.ACCEPT, reply: Reply | None = None,
      **kw: object) -> CheckResult:
    return CheckResult(check, kw.pop("result", Result.NONE), action=action,  # type: ignore[arg-type]
                       reply=reply, **kw)  # type: ignore[arg-type]


def test_severity_order() -> None:
    q = r("a", Action.QUARANTINE, reason="held")
    t = r("b", Action.TEMPFAIL, Reply(451, "4.7.1", "later"))
    j = r("c", Action.REJECT, Reply(554, "5.7.1", "no"))
    d = r("d", Action.DISCARD)
    assert policy.decide((q, t, j, d), POLICY).action is Action.REJECT
    assert str(policy.decide((q, t, j, d), POLICY).reply) == "554 5.7.1 no"
    assert policy.decide((q, d, t), POLICY).action is Action.TEMPFAIL
    assert policy.decide((q, d), POLICY).action is Action.DISCARD
    v = policy.decide((r("x"), q), POLICY)
    assert (v.action, v.quarantine_reason, v.decided_by) == (Action.QUARANTINE, "a: held", "a")
    assert policy.decide((), POLICY).action is Action.ACCEPT


def test_first_check_of_equal_severity_names_the_reply() -> None:
    v = policy.decide((r("a", Action.REJECT, Reply(530, "5.7.0", "tls")),
                       r("b", Action.REJECT, Reply(550, "5.7.1", "other"))), POLICY)
    assert (str(v.reply), v.decided_by) == ("530 5.7.0 tls", "a")


def test_default_replies() -> None:
    assert str(policy.decide((r("a", Action.REJECT),), POLICY).reply) == \
        "550 5.7.1 Message refused by policy"
    assert str(policy.decide((r("a", Action.TEMPFAIL, result=Result.TEMPERROR),), POLICY)
               .reply) == "451 4.7.0 Temporary failure in message checks, try again later"
    assert str(policy.decide((r("a", Action.TEMPFAIL),), POLICY).reply) == \
        "451 4.7.1 Try again later"


def test_before_eom_only_reject_and_tempfail_decide() -> None:
    v = policy.decide((r("a", Action.QUARANTINE),), POLICY, final=False)
    assert (v.action, v.reply) == (Action.ACCEPT, None)


def test_edits_merge_deletes_first_highest_index_first() -> None:
    a = r("bcc", edits=(DeleteHeader("Bcc", 1), DeleteHeader("Bcc", 2)))
    b = r("authres", edits=(DeleteHeader("Authentication-Results", 1),
                            DeleteHeader("Authentication-Results", 3),
                            AddHeader("Authentication-Results", "x; none", top=True)))
    c = r("trace", edits=(ChangeHeader("Received", 2, "v"), DeleteHeader("bcc", 2)))
    v = policy.decide((a, b, c), POLICY)
    assert v.edits == (DeleteHeader("Authentication-Results", 3),
                       DeleteHeader("Authentication-Results", 1),
                       DeleteHeader("Bcc", 2), DeleteHeader("Bcc", 1),
                       ChangeHeader("Received", 2, "v"),
                       AddHeader("Authentication-Results", "x; none", top=True))


def test_delete_beats_change_of_the_same_field() -> None:
    v = policy.decide((r("a", edits=(ChangeHeader("Received", 1, "x"),)),
                       r("b", edits=(DeleteHeader("received", 1),))), POLICY)
    assert v.edits == (DeleteHeader("received", 1),)


def test_no_edits_when_refused() -> None:
    v = policy.decide((r("a", Action.REJECT), r("b", edits=(DeleteHeader("Bcc", 1),))), POLICY)
    assert v.edits == ()


def test_quarantine_reason_is_bounded_and_safe() -> None:
    v = policy.decide((r("a", Action.QUARANTINE, reason="x\r\n" * 80),), POLICY)
    assert len(v.quarantine_reason) <= 100 and "\n" not in v.quarantine_reason


# -- quarantine: hold or tag (issue 13, item 6) ------------------------------------------------

def _quarantined(*results: CheckResult) -> Verdict:
    return policy.decide((r("authres", edits=(AddHeader("Authentication-Results", "mx; x"),)),
                          *results), POLICY)


HEADERS = (Header("From", " a@example.org", 1), Header("Subject", " pay now", 1),
           Header("X-Mailward-Quarantine", " forged: deliver me", 1),
           Header("x-mailward-quarantine", " another", 2))
TAGGED = dataclasses.replace(POLICY, quarantine_subject_tag="[SPAM]")


def test_a_quarantine_is_held_unless_its_check_says_tag() -> None:
    v = _quarantined(r("dmarc", Action.QUARANTINE, reason="p=quarantine"))
    held = policy.carry_out_quarantine(v, HEADERS, Direction.INBOUND, TAGGED, {})
    assert held == dataclasses.replace(v, quarantine=Quarantine.HOLD)
    assert held.edits == v.edits  # nothing added: Postfix's hold queue keeps it


def test_a_tagged_quarantine_names_the_reason_and_tags_the_subject() -> None:
    v = _quarantined(r("dmarc", Action.QUARANTINE, reason="p=quarantine at held.example"))
    tagged = policy.carry_out_quarantine(v, HEADERS, Direction.INBOUND, TAGGED,
                                         {"dmarc": Quarantine.TAG})
    assert (tagged.action, tagged.quarantine) == (Action.QUARANTINE, Quarantine.TAG)
    assert tagged.edits == (
        ChangeHeader("Subject", 1, "[SPAM] pay now"),
        DeleteHeader("x-mailward-quarantine", 2),  # what the sender wrote goes first
        DeleteHeader("X-Mailward-Quarantine", 1),
        AddHeader("Authentication-Results", "mx; x"),
        AddHeader("X-Mailward-Quarantine", "dmarc: p=quarantine at held.example"))
    # no Subject: one is added; already tagged: left alone; no tag configured: kept
    bare = (Header("From", " a@example.org", 1),)
    assert AddHeader("Subject", "[SPAM]") in policy.carry_out_quarantine(
        v, bare, Direction.INBOUND, TAGGED, {"dmarc": Quarantine.TAG}).edits
    again = (Header("Subject", " [SPAM] pay now", 1),)
    assert not any(isinstance(e, ChangeHeader) for e in policy.carry_out_quarantine(
        v, again, Direction.INBOUND, TAGGED, {"dmarc": Quarantine.TAG}).edits)
    assert not any(e.name == "Subject" for e in policy.carry_out_quarantine(
        v, HEADERS, Direction.INBOUND, POLICY, {"dmarc": Quarantine.TAG}).edits)


def test_hold_wins_and_only_inbound_mail_is_tagged() -> None:
    v = _quarantined(r("tls", Action.QUARANTINE, reason="TLSv1.2"),
                     r("dmarc", Action.QUARANTINE, reason="p=quarantine"))
    modes = {"tls": Quarantine.HOLD, "dmarc": Quarantine.TAG}
    assert policy.carry_out_quarantine(v, HEADERS, Direction.INBOUND, TAGGED,
                                       modes).quarantine is Quarantine.HOLD
    modes["tls"] = Quarantine.TAG
    assert policy.carry_out_quarantine(v, HEADERS, Direction.INBOUND, TAGGED,
                                       modes).quarantine is Quarantine.TAG
    for direction in (Direction.OUTBOUND, Direction.INTERNAL):  # our signature covers Subject
        out = policy.carry_out_quarantine(v, HEADERS, direction, TAGGED, modes)
        assert (out.quarantine, out.edits) == (Quarantine.HOLD, v.edits)


def test_other_verdicts_are_not_touched() -> None:
    for action in (Action.ACCEPT, Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
        v = _quarantined(r("dmarc", action))
        assert policy.carry_out_quarantine(v, HEADERS, Direction.INBOUND, TAGGED,
                                           {"dmarc": Quarantine.TAG}) is v


def test_a_subject_of_raw_8bit_bytes_is_not_tagged() -> None:
    v = _quarantined(r("dmarc", Action.QUARANTINE, reason="p=quarantine"))
    raw = (Header("Subject", " caf\udce9", 1),)
    edits = policy.carry_out_quarantine(v, raw, Direction.INBOUND, TAGGED,
                                        {"dmarc": Quarantine.TAG}).edits
    assert not any(e.name == "Subject" for e in edits)
    assert AddHeader("X-Mailward-Quarantine", "dmarc: p=quarantine") in edits
