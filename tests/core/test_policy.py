"""Policy: severity, replies, merged edits."""

from __future__ import annotations

from mailward.core import policy
from mailward.core.verdict import (
    Action,
    AddHeader,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    Reply,
    Result,
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
