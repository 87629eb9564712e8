"""Combine check results into one Verdict.

Severity decides: reject > tempfail > discard > quarantine > accept; among equals the first
check in the chain names the reply. Header edits of all checks are merged in an order the MTA
can apply safely: deletions and changes first, per field name highest index first (so no
deletion shifts a later one), then additions.
"""

from __future__ import annotations

from mailward.core.settings import PolicySettings
from mailward.core.verdict import (
    Action,
    CheckResult,
    HeaderEdit,
    Result,
    Verdict,
    order_edits,
    safe_text,
)

# libmilter limits the quarantine reason; Postfix logs it (smfi_quarantine).
QUARANTINE_REASON_MAX = 100


def decide(results: tuple[CheckResult, ...], policy: PolicySettings, *,
           final: bool = True) -> Verdict:
    """The verdict for `results`. Before end of message (`final=False`) only reject and
    tempfail are decisive; quarantine and header edits wait for end of message."""
    winner: CheckResult | None = None
    for r in results:
        if r.action.severity > (winner.action.severity if winner else 0):
            winner = r
    action = winner.action if winner else Action.ACCEPT
    if not final and action not in (Action.REJECT, Action.TEMPFAIL):
        action, winner = Action.ACCEPT, None
    reply = None
    if action is Action.REJECT:
        reply = (winner.reply if winner and winner.reply and not winner.reply.temporary
                 else policy.reject_reply)
    elif action is Action.TEMPFAIL:
        if winner and winner.reply and winner.reply.temporary:
            reply = winner.reply
        elif winner and winner.reply is None and winner.result is Result.TEMPERROR:
            reply = policy.error_reply
        else:
            reply = policy.tempfail_reply
    reason = ""
    edits: tuple[HeaderEdit, ...] = ()
    if action in (Action.ACCEPT, Action.QUARANTINE):
        edits = order_edits([e for r in results for e in r.edits])
    if action is Action.QUARANTINE:
        reason = "; ".join(f"{r.check}: {r.reason or r.result}" for r in results
                           if r.action is Action.QUARANTINE)
        reason = safe_text(reason, limit=QUARANTINE_REASON_MAX)
    return Verdict(action=action, reply=reply, edits=edits, quarantine_reason=reason,
                   results=results, decided_by=winner.check if winner else "")
