"""spf: may the client IP send for the MAIL FROM domain, and for the HELO name? (RFC 7208)

Evaluated with pyspf, whose DNS goes through the transaction's resolver (`dns.pyspf_scope`),
within the message's DNS budget. Inbound mail only: outbound and internal mail from our own
users is never judged (result `none`, nothing in Authentication-Results). The outcome
(`SpfOutcome`: each identity, its domain and result) is what DMARC reads.

Results are RFC 7208's words: pass, fail, softfail, neutral, none, temperror (DNS timeout or
SERVFAIL: never `fail` or `none`), permerror. The HELO identity is checked on its own
(§2.3, `smtp.helo`); for the null sender `<>` the MAIL FROM result is the HELO result (§2.4).
Each result has a configurable action (default accept: SPF feeds DMARC); a refusal is sent at
MAIL FROM. With every action accept, SPF is evaluated once, at end of message.

A result is kept (`evaluate`, the resolver's `Memo`) for as long as the DNS answers it was
computed from, so mail from the same IP, sender and HELO name is not evaluated again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import spf as pyspf

from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.ini import Section
from mailward.core.outcomes import SpfIdentity, SpfOutcome, SpfScope
from mailward.core.transaction import Direction, Stage, Transaction, domain_of
from mailward.core.verdict import Action, CheckResult, Reply, Result
from mailward.services.dns import Memo, pyspf_installed, pyspf_scope, spoil

NAME = "spf"
ACTIONS = (Action.ACCEPT, Action.REJECT, Action.TEMPFAIL, Action.QUARANTINE)
RESULTS = ("fail", "softfail", "neutral", "none", "permerror", "temperror")
MAX_KEPT_EXPLANATION = 512  # characters; a sender's exp= text can be kilobytes
_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.?")


@dataclass(frozen=True)
class Settings:
    """[check.spf]"""

    check_helo: bool = True
    timeout: float = 15.0  # all lookups of one evaluation (RFC 7208 §4.6.4 suggests >= 20)
    on_fail: Action = Action.ACCEPT
    on_softfail: Action = Action.ACCEPT
    on_neutral: Action = Action.ACCEPT
    on_none: Action = Action.ACCEPT
    on_permerror: Action = Action.ACCEPT
    on_temperror: Action = Action.ACCEPT
    fail_reply: Reply = Reply(550, "5.7.23", "SPF validation failed")
    permerror_reply: Reply = Reply(550, "5.7.24", "SPF record of the sender domain is invalid")
    temperror_reply: Reply = Reply(451, "4.7.24", "SPF check failed temporarily, try again later")

    @classmethod
    def load(cls, sec: Section) -> Settings:
        actions = {f"on_{r}": sec.choice(f"on_{r}", Action, Action.ACCEPT, ACTIONS)
                   for r in RESULTS}
        return cls(
            check_helo=sec.boolean("check_helo", cls.check_helo),
            timeout=sec.seconds("timeout", cls.timeout, maximum=60),
            **actions,
            fail_reply=sec.reply("fail_reply", str(cls.fail_reply), temporary=False),
            permerror_reply=sec.reply("permerror_reply", str(cls.permerror_reply),
                                      temporary=False),
            temperror_reply=sec.reply("temperror_reply", str(cls.temperror_reply),
                                      temporary=True),
        )

    def refuses(self) -> bool:
        """Could any result refuse the message? If not, MAIL FROM need not evaluate."""
        return any(getattr(self, f"on_{r}") is not Action.ACCEPT for r in RESULTS)

    def action(self, result: Result) -> Action:
        action: Action = getattr(self, f"on_{result}", Action.ACCEPT)
        return action


def evaluate(*, ip: str, sender: str, helo: str, timeout: float,
             memo: Memo | None = None) -> tuple[Result, str]:
    """One SPF evaluation (RFC 7208 §4): the result and pyspf's explanation.

    With a `memo`, a result is kept as long as every DNS answer it read (`services/dns.Memo`)
    and given again for the same IP, sender and HELO name without asking pyspf: the result
    depends on nothing else but the time macro and pyspf's own clock (`_evaluate`), and a
    result either touched is not kept. A temperror is never kept, nor a result whose
    explanation (a sender's exp= text) is long."""
    def make() -> tuple[Result, str]:
        return _evaluate(ip=ip, sender=sender, helo=helo, timeout=timeout)

    if memo is None:
        return make()
    return memo.compute((NAME, ip, sender, helo), make, lambda outcome: (
        outcome[0] is not Result.TEMPERROR and len(outcome[1]) <= MAX_KEPT_EXPLANATION))


def _evaluate(*, ip: str, sender: str, helo: str, timeout: float) -> tuple[Result, str]:
    """pyspf's evaluation. Once its `querytime` is spent, pyspf refuses further lookups
    itself (TempError), unseen by the resolver, and its bare except around exp= swallows
    that: the fail then carries the default explanation. Such a result is the moment's."""
    try:
        q = pyspf.query(i=ip, s=sender, h=helo, querytime=timeout)
        word, _, explanation = q.check()
        if q.querytime < 0:
            spoil()
    except pyspf.TempError as exc:  # raised outside check() for some inputs
        return Result.TEMPERROR, str(exc)
    except pyspf.PermError as exc:
        return Result.PERMERROR, str(exc)
    try:
        return Result(word), str(explanation)
    except ValueError:
        return Result.PERMERROR, f"unexpected SPF result {word!r}"


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Evaluate SPF for HELO and MAIL FROM (see the module docstring)."""
    if tx.client_ip is None:
        return CheckResult(NAME, Result.NONE, reason="no client address", outcome=SpfOutcome())
    if tx.stage is Stage.MAIL and not settings.refuses():
        return CheckResult(NAME, Result.NONE, reason="evaluated at end of message")
    if not pyspf_installed():
        # never let pyspf fall back to its own, unbounded and uncounted, DNS
        raise RuntimeError("pyspf's lookup is not mailward's (services/dns.install_pyspf)")
    mapped = getattr(tx.client_ip, "ipv4_mapped", None)
    ip = str(mapped or tx.client_ip)
    identities = []
    memo = ctx.dns.resolver.memo
    with pyspf_scope(ctx.dns):
        if (settings.check_helo or not tx.mail_from) and _HOSTNAME.fullmatch(tx.helo):
            timeout = min(settings.timeout, ctx.dns.budget.remaining())
            result, why = evaluate(ip=ip, sender=f"postmaster@{tx.helo}", helo=tx.helo,
                                   timeout=timeout, memo=memo)
            identities.append(SpfIdentity(SpfScope.HELO, tx.helo, tx.helo.rstrip(".").lower(),
                                          result, why))
        if tx.mail_from:
            timeout = min(settings.timeout, ctx.dns.budget.remaining())
            result, why = evaluate(ip=ip, sender=tx.mail_from, helo=tx.helo, timeout=timeout,
                                   memo=memo)
            identities.append(SpfIdentity(SpfScope.MAILFROM, tx.mail_from,
                                          domain_of(tx.mail_from), result, why))
    outcome = SpfOutcome(tuple(identities))
    chosen = outcome.dmarc_identity  # MAIL FROM, or HELO for the null sender (§2.4)
    if chosen is not None:
        result, why = chosen.result, chosen.reason
    else:
        result, why = Result.NONE, "null sender and no usable HELO name"
    action = settings.action(result)
    reply = None
    if action in (Action.REJECT, Action.TEMPFAIL):
        reply = {Result.TEMPERROR: settings.temperror_reply,
                 Result.PERMERROR: settings.permerror_reply}.get(result, settings.fail_reply)
        if action is Action.TEMPFAIL and not reply.temporary:
            reply = settings.temperror_reply
        if action is Action.REJECT and reply.temporary:
            reply = settings.fail_reply
    return CheckResult(NAME, result, action=action, reply=reply, reason=why,
                       authres=outcome.entries(), outcome=outcome)


class Spf(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.MAIL, Stage.EOM})
    directions = frozenset({Direction.INBOUND})
    uses = frozenset({Service.DNS})


CHECK = Spf(Settings.load, check)
