"""Combine check results into one Verdict.

Severity decides: reject > tempfail > discard > quarantine > accept; among equals the first
check in the chain names the reply. Header edits of all checks are merged in an order the MTA
can apply safely: deletions and changes first, per field name highest index first (so no
deletion shifts a later one), then additions.

A quarantine is carried out as each quarantining check's `quarantine` setting says: `hold`
(Postfix's hold queue) when any of them says hold, else `tag`: the message is delivered with
`[policy] quarantine_header` naming the reason (fields of that name the message brought are
deleted first, so only ours is seen) and `quarantine_subject_tag` before its Subject. Only
inbound mail is tagged: changing what we sign or seal would break our own signatures, so
outbound and internal mail is held.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from mailward.core.settings import PolicySettings
from mailward.core.transaction import Direction, Header
from mailward.core.verdict import (
    Action,
    AddHeader,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    HeaderEdit,
    Quarantine,
    Result,
    Verdict,
    order_edits,
    safe_text,
)

# Bytes that were not UTF-8 arrive as surrogate escapes; the MTA takes only UTF-8 text back.
_UNDECODED = re.compile("[\udc80-\udcff]")

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


def carry_out_quarantine(verdict: Verdict, headers: tuple[Header, ...], direction: Direction,
                         policy: PolicySettings, modes: Mapping[str, Quarantine]) -> Verdict:
    """A final QUARANTINE verdict, held or tagged (see the module docstring); any other
    verdict unchanged. `modes` is each check's `quarantine` setting."""
    if verdict.action is not Action.QUARANTINE:
        return verdict
    quarantining = [r.check for r in verdict.results if r.action is Action.QUARANTINE]
    if (direction is not Direction.INBOUND
            or any(modes.get(c, Quarantine.HOLD) is Quarantine.HOLD for c in quarantining)):
        return dataclasses.replace(verdict, quarantine=Quarantine.HOLD)
    name = policy.quarantine_header
    edits: list[HeaderEdit] = [DeleteHeader(h.name, h.index) for h in headers
                               if h.name.lower() == name.lower()]
    edits.append(AddHeader(name, verdict.quarantine_reason or "quarantined"))
    tag = policy.quarantine_subject_tag
    subject = next((h for h in headers if h.name.lower() == "subject"), None)
    if tag and subject is None:
        edits.append(AddHeader("Subject", tag))
    elif (tag and subject is not None and not subject.value.lstrip().startswith(tag)
          and not _UNDECODED.search(subject.value)):  # raw 8-bit bytes: left as they came
        edits.append(ChangeHeader(subject.name, subject.index,
                                  f"{tag} {subject.value.lstrip()}"))
    return dataclasses.replace(verdict, quarantine=Quarantine.TAG,
                               edits=order_edits([*verdict.edits, *edits]))
