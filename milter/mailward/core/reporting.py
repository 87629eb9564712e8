"""What one message contributes to a DMARC aggregate report (RFC 9990 §2.1), from the final
verdict: the disposition actually applied and, where it differs from what the domain's policy
asked, why (`reason`: trusted_forwarder for an ARC override, policy_test_mode for t=y,
local_policy for monitor mode, never_reject, reject_as or another check's decision). Pure.
"""

from __future__ import annotations

from mailward.core.ini import DOMAIN_RE
from mailward.core.outcomes import DkimOutcome, DmarcOutcome, SpfOutcome
from mailward.core.transaction import Transaction
from mailward.core.verdict import Action, Result, Verdict
from mailward.services.reportstore import MessageRecord

MAX_SIGNATURES = 16  # of one message, kept in its row (a message may carry hundreds)
_DISPOSITION = {Action.REJECT: "reject", Action.QUARANTINE: "quarantine"}


def _domain(name: str) -> str:
    """A DNS name the client gave, or "" (whatever else it sent has no place in a report)."""
    name = name.lower().rstrip(".")
    return name if name.isascii() and DOMAIN_RE.fullmatch(name) else ""


def message_record(tx: Transaction, verdict: Verdict, now: int) -> MessageRecord | None:
    """The report row for a message whose verdict is final (not a tempfail), or None: no
    DMARC policy was evaluated (none found, no usable From, a temporary error)."""
    if verdict.action is Action.TEMPFAIL or tx.client_ip is None:
        return None  # a retry will be counted; mail not from an SMTP client is not reported
    dmarc = next((r for r in verdict.results if isinstance(r.outcome, DmarcOutcome)), None)
    if dmarc is None:
        return None
    outcome = dmarc.outcome
    assert isinstance(outcome, DmarcOutcome)
    if outcome.result not in (Result.PASS, Result.FAIL) or not outcome.policy_domain:
        return None
    passed = outcome.result is Result.PASS
    disposition = _DISPOSITION.get(verdict.action, "pass" if passed else "none")
    asked = "none" if passed else outcome.applied or "none"
    reasons: list[tuple[str, str]] = []
    if outcome.arc_override:
        reasons.append(("trusted_forwarder", f"ARC sealed by {outcome.arc_override}"))
    if not passed and dict(outcome.record).get("testing") == "y":
        reasons.append(("policy_test_mode", f"published {outcome.published}"))
    if dmarc.would is not None:
        reasons.append(("local_policy", f"monitor mode: would {dmarc.would}"))
    if verdict.decided_by and verdict.decided_by != "dmarc" and verdict.action in _DISPOSITION:
        reasons.append(("local_policy", f"{verdict.action} by {verdict.decided_by}"))
    elif not passed and dmarc.would is None and asked != disposition \
            and not outcome.arc_override:
        reasons.append(("local_policy", f"policy asked {asked}, applied {disposition}"))
    aligned = {a.partition(":")[0] for a in outcome.aligned}
    dkim = next((r.outcome for r in verdict.results if isinstance(r.outcome, DkimOutcome)),
                None)
    spf = next((r.outcome for r in verdict.results if isinstance(r.outcome, SpfOutcome)), None)
    identity = spf.dmarc_identity if spf is not None else None
    return MessageRecord(
        time=now, policy_domain=outcome.policy_domain, header_from=outcome.author_domain,
        envelope_from=_domain(tx.mail_from.rpartition("@")[2]),
        source_ip=str(tx.client_ip),
        disposition=disposition,
        dkim_aligned="pass" if "dkim" in aligned else "fail",
        spf_aligned="pass" if "spf" in aligned else "fail",
        reasons=tuple(reasons),
        # d= of a signature is what the message said: one that names no domain would make
        # strict report consumers refuse the whole report, so it is left out
        dkim=tuple((s.domain, s.selector[:64], str(s.result)) for s in dkim.signatures
                   if DOMAIN_RE.fullmatch(s.domain))[:MAX_SIGNATURES] if dkim else (),
        spf=((identity.domain, str(identity.scope), str(identity.result))
             if identity is not None else ("", "", "")),
        policy=outcome.record)
