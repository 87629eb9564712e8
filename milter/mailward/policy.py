"""Combine check results into one Verdict.

Severity decides: reject > tempfail > discard > quarantine > accept; among equals the first
check in the chain names the reply. Header edits of all checks are merged in an order the MTA
can apply safely: deletions and changes first, per field name highest index first (so no
deletion shifts a later one), then additions.
"""

from __future__ import annotations

from mailward.config import PolicySettings
from mailward.transaction import Header
from mailward.verdict import (
    Action,
    AddHeader,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    HeaderEdit,
    Result,
    Verdict,
    safe_text,
)

# libmilter limits the quarantine reason; Postfix logs it (smfi_quarantine).
QUARANTINE_REASON_MAX = 100


def _order(edits: list[HeaderEdit]) -> tuple[HeaderEdit, ...]:
    # One edit per field (names compare without case): two checks deleting the same field
    # must delete it once, and a deletion beats a change of the same field.
    by_field: dict[tuple[str, int], DeleteHeader | ChangeHeader] = {}
    for e in edits:
        if isinstance(e, AddHeader):
            continue
        key = (e.name.lower(), e.index)
        if key not in by_field or (isinstance(e, DeleteHeader)
                                   and not isinstance(by_field[key], DeleteHeader)):
            by_field[key] = e
    indexed = sorted(by_field.values(), key=lambda e: (e.name.lower(), -e.index))
    return (*indexed, *(e for e in edits if isinstance(e, AddHeader)))


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
        edits = _order([e for r in results for e in r.edits])
    if action is Action.QUARANTINE:
        reason = "; ".join(f"{r.check}: {r.reason or r.result}" for r in results
                           if r.action is Action.QUARANTINE)
        reason = safe_text(reason, limit=QUARANTINE_REASON_MAX)
    return Verdict(action=action, reply=reply, edits=edits, quarantine_reason=reason,
                   results=results, decided_by=winner.check if winner else "")


def apply_edits(headers: tuple[Header, ...], edits: tuple[HeaderEdit, ...]
                ) -> list[tuple[str, str]]:
    """The header as the MTA will have it after `edits` (for signing what leaves).

    Values keep the milter convention: a changed or added value gets one leading space.
    """
    ordered = _order(list(edits))
    fields: list[tuple[str, str] | None] = [(h.name, h.value) for h in headers]
    positions: dict[tuple[str, int], int] = {
        (h.name.lower(), h.index): i for i, h in enumerate(headers)}
    for e in ordered:
        if isinstance(e, DeleteHeader | ChangeHeader):
            i = positions.get((e.name.lower(), e.index))
            if i is None or fields[i] is None:
                continue
            fields[i] = None if isinstance(e, DeleteHeader) else (e.name,
                                                                  " " + e.value.lstrip())
    out = [f for f in fields if f is not None]
    for e in ordered:
        if isinstance(e, AddHeader):
            if e.top:
                out.insert(0, (e.name, " " + e.value))
            else:
                out.append((e.name, " " + e.value))
    return out
