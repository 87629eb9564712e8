"""dmarc: is the From domain aligned with a passing SPF or DKIM identity, and what does its
policy say? (RFC 9989, the DMARCbis text in shared/reference; RFC 7489 behaviour on request)

Inbound mail only: our own users' outbound mail is never judged. Reads the typed outcomes of
the `spf` and `dkim` checks earlier in the chain (`SpfOutcome`, `DkimOutcome`); looks nothing up
twice. Publishes a `DmarcOutcome` (author domain, policy as published and as applied, aligned
identifiers) for what comes after it.

Author Domain (§5.3.1): exactly one From field with exactly one address; comments and quoted
strings are skipped, every `@domain` counts (so `"x" <a@evil> <b@good>` is two), a trailing
dot is dropped and U-labels become A-labels. Otherwise `permerror` (multiple authors:
`on_multiple_from`, default reject, §11.5; none or unparseable: `on_permerror`).

Policy discovery (§4.10.1) by the DNS Tree Walk (§4.10: at most 8 queries, psd= honoured,
duplicate records discarded) or, with `org_domain = psl`, RFC 7489's public suffix list
method. Alignment (§4.10.2) relaxed or strict per adkim/aspf. Policy p, sp or np (np for a
non-existent subdomain: no A, AAAA or MX, §3.2.13); t=y applies one level less; pct (RFC 7489,
removed by RFC 9989) is ignored unless `honour_pct`. An invalid p/sp/np means p=none when rua
holds a valid URI, else no DMARC (§4.10.1).

Results: pass, fail, none (no policy), temperror (DNS failure in discovery, or no aligned
pass while SPF/DKIM had a temperror), permerror (From). A-R: dmarc=RESULT header.from=DOMAIN
policy.dmarc=DISPOSITION, the reason naming the published policy.

ARC (RFC 8617, the `arc` check's `ArcOutcome`, when it runs before this one): a failure whose
disposition would be quarantine or reject is accepted when the chain passes and a trusted
sealer (`[check.arc] trusted_sealers`) vouches for this Author Domain: its
ARC-Authentication-Results recorded dmarc=pass for it, or a DKIM or SPF pass that aligns with
it here (adkim/aspf of the policy found now). The result stays fail; the A-R says
`dmarc=fail reason="p=reject; accepted by ARC from SEALER" ... policy.dmarc=none`, the log
says so and `mailward_arc_overrides_total{sealer}` counts it. When the chain is a temperror
because a trusted sealer's key could not be looked up, and its findings would vouch, the
result is temperror (a retry may pass). Only the `arc` check decides which sealers vouch
(see ArcVouch); never an untrusted sealer, a failing chain, or a sealer that saw no pass.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from publicsuffixlist import PublicSuffixList

from mailward.core.addresses import MAX_AUTHORS, AuthorProblem, authors, normalise_domain
from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.ini import Section
from mailward.core.outcomes import ArcOutcome, ArcVouch, DkimOutcome, DmarcOutcome, SpfOutcome
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import Action, CheckResult, Reply, Result
from mailward.services.dns import BoundResolver, DnsError

NAME = "dmarc"
POLICIES = ("none", "quarantine", "reject")
MAX_WALK_LABELS = 7  # §4.10 step 4: longer names are cut to 7 labels, 8 queries at most
MAX_RUA = 4  # rua destinations kept for reports (RFC 9990 lets a receiver send to fewer)
MAX_KEPT_RECORD = 512  # octets of TXT; a sender's record can be 60 kB, a megabyte parsed
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")

log = logging.getLogger(__name__)


# -- records ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """A DMARC Policy Record (§4.7). Invalid policy values are kept as given, for §4.10.1."""

    p: str | None = None
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    t: str = "n"
    psd: str = "u"
    pct: int = 100
    rua: tuple[str, ...] = ()

    def usable(self) -> Record | None:
        """The record as policy processing sees it (§4.10.1), or None: no DMARC."""
        bad = [v for v in (self.p, self.sp, self.np) if v is not None and v not in POLICIES]
        if self.p is not None and not bad:
            return self
        if any(_URI.fullmatch(u) for u in self.rua):
            return Record(p="none", adkim=self.adkim, aspf=self.aspf, t=self.t, psd=self.psd,
                          pct=self.pct, rua=self.rua)
        return None


def parse_record(text: str) -> Record | None:
    """Parse a TXT string; None unless it starts with the tag v=DMARC1 (§4.7).

    Unknown tags and tags with invalid values are ignored (defaults apply), except that
    p/sp/np keep their invalid value for `Record.usable`.
    """
    parts = [p.strip() for p in text.split(";")]
    first = parts[0].split("=", 1)
    if len(first) != 2 or first[0].strip() != "v" or first[1].strip() != "DMARC1":
        return None
    tags: dict[str, Any] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or key in tags:
            continue
        if key in ("p", "sp", "np"):
            tags[key] = value.lower()
        elif key in ("adkim", "aspf") and value.lower() in ("r", "s"):
            tags[key] = value.lower()
        elif key == "t" and value.lower() in ("y", "n"):
            tags[key] = value.lower()
        elif key == "psd" and value.lower() in ("y", "n", "u"):
            tags[key] = value.lower()
        elif key == "pct" and value.isdigit() and 0 <= int(value) <= 100:
            tags[key] = int(value)
        elif key == "rua":
            tags[key] = tuple(u.strip() for u in value.split(",") if u.strip())
    return Record(**tags)


# -- settings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """[check.dmarc]"""

    org_domain: str = "treewalk"
    honour_pct: bool = False
    reject_as: Action = Action.REJECT
    never_reject: tuple[str, ...] = ()
    on_temperror: Action = Action.TEMPFAIL
    on_permerror: Action = Action.ACCEPT
    on_multiple_from: Action = Action.REJECT
    multiple_author_domains: str = "refuse"
    max_author_domains: int = 5
    on_malformed_from: Action = Action.REJECT
    reject_reply: Reply = Reply(550, "5.7.1", "Rejected by the DMARC policy of the sender "
                                              "domain")
    temperror_reply: Reply = Reply(451, "4.7.5", "DMARC policy lookup failed, try again later")
    multiple_from_reply: Reply = Reply(550, "5.7.1", "Exactly one author domain is required "
                                                     "(RFC 5322 From)")
    malformed_from_reply: Reply = Reply(550, "5.7.1", "Malformed From field: the author "
                                                      "domain cannot be determined")
    psl: PublicSuffixList | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        org = sec.option("org_domain", cls.org_domain, ("treewalk", "psl"))
        refusals = (Action.ACCEPT, Action.REJECT, Action.QUARANTINE, Action.TEMPFAIL)
        return cls(
            org_domain=org,
            honour_pct=sec.boolean("honour_pct", cls.honour_pct),
            reject_as=sec.choice("reject_as", Action, cls.reject_as,
                                 (Action.REJECT, Action.QUARANTINE, Action.ACCEPT)),
            never_reject=sec.domains("never_reject"),
            on_temperror=sec.choice("on_temperror", Action, cls.on_temperror,
                                    (Action.TEMPFAIL, Action.ACCEPT)),
            on_permerror=sec.choice("on_permerror", Action, cls.on_permerror, refusals),
            on_multiple_from=sec.choice("on_multiple_from", Action, cls.on_multiple_from,
                                        refusals),
            multiple_author_domains=sec.option("multiple_author_domains",
                                               cls.multiple_author_domains,
                                               ("refuse", "strictest")),
            max_author_domains=sec.integer("max_author_domains", cls.max_author_domains,
                                           minimum=2, maximum=MAX_AUTHORS),
            on_malformed_from=sec.choice("on_malformed_from", Action, cls.on_malformed_from,
                                         refusals),
            reject_reply=sec.reply("reject_reply", str(cls.reject_reply), temporary=False),
            temperror_reply=sec.reply("temperror_reply", str(cls.temperror_reply),
                                      temporary=True),
            multiple_from_reply=sec.reply("multiple_from_reply", str(cls.multiple_from_reply),
                                          temporary=False),
            malformed_from_reply=sec.reply("malformed_from_reply",
                                           str(cls.malformed_from_reply), temporary=False),
            psl=PublicSuffixList() if org == "psl" else None,
        )


# -- discovery and alignment -----------------------------------------------------------------

def _record_at(resolver: BoundResolver, domain: str) -> Record | None:
    """The single DMARC record at _dmarc.domain; several are all discarded (§4.10 step 2).

    Parsed once for as long as its TXT answer is cached (the resolver's `Memo`), unless it is
    long: parsed, a sender's 60 kB "rua=ab,ab,…" is 20 000 strings, over a megabyte, and
    the memo holds as many entries as the DNS cache."""
    def parsed() -> tuple[Record | None, int]:
        records = [(r, len(t)) for t in resolver.txt(f"_dmarc.{domain}")
                   if (r := parse_record(t.decode("utf-8", "replace"))) is not None]
        return records[0] if len(records) == 1 else (None, 0)

    found, _ = resolver.resolver.memo.compute((NAME, domain), parsed,
                                              lambda got: got[1] <= MAX_KEPT_RECORD)
    return found


def _next_target(labels: list[str]) -> list[str]:
    """§4.10 step 4: drop the left-most label; from 8 labels on, cut to 7."""
    if len(labels) >= MAX_WALK_LABELS + 1:
        return labels[-MAX_WALK_LABELS:]
    return labels[1:]


def tree_walk(resolver: BoundResolver, domain: str, *, include_start: bool = True
              ) -> list[tuple[str, Record]]:
    """The records found walking up from `domain` (§4.10), longest name first."""
    labels = domain.split(".")
    if not include_start:
        labels = _next_target(labels)
    found = []
    while labels:
        name = ".".join(labels)
        record = _record_at(resolver, name)
        if record is not None:
            found.append((name, record))
            if record.psd in ("y", "n"):
                break
        labels = _next_target(labels)
    return found


def org_domain_of(start: str, found: list[tuple[str, Record]]) -> str:
    """The Organizational Domain from a tree walk's records (§4.10.2)."""
    for name, record in found:
        if record.psd == "n":
            return name
        if record.psd == "y" and name != start:
            depth = name.count(".") + 2
            return ".".join(start.split(".")[-depth:])
    if found:
        return min(found, key=lambda f: f[0].count("."))[0]
    return start


@dataclass(frozen=True, slots=True)
class Policy:
    """The record that applies to the Author Domain and where it was found."""

    domain: str  # where the record was found
    record: Record
    org: str  # the Author Domain's Organizational Domain


class Discovery:
    """Policy discovery and Organizational Domains for one message, by walk or PSL."""

    def __init__(self, resolver: BoundResolver, settings: Settings) -> None:
        self.resolver = resolver
        self.settings = settings
        self._orgs: dict[str, str] = {}

    def org(self, domain: str) -> str:
        if domain not in self._orgs:
            if self.settings.psl is not None:
                self._orgs[domain] = self.settings.psl.privatesuffix(domain) or domain
            else:
                self._orgs[domain] = org_domain_of(domain, tree_walk(self.resolver, domain))
        return self._orgs[domain]

    def policy(self, author: str) -> Policy | None:
        if self.settings.psl is not None:  # RFC 7489 §6.6.3
            org = self.org(author)
            for name in dict.fromkeys((author, org)):
                record = _record_at(self.resolver, name)
                if record is not None:
                    return Policy(name, record, org)
            return None
        own = _record_at(self.resolver, author)
        found = tree_walk(self.resolver, author, include_start=False)
        org = org_domain_of(author, ([(author, own)] if own else []) + found)
        self._orgs[author] = org
        if own is not None:
            return Policy(author, own, org)
        if not found:
            return None
        records = dict(found)
        if org in records:
            return Policy(org, records[org], org)
        psd = next(((n, r) for n, r in found if r.psd == "y"), found[-1])
        return Policy(psd[0], psd[1], org)

    def exists(self, domain: str) -> bool:
        """§3.2.13: a domain exists unless A, AAAA and MX all come back empty."""
        return any(self.resolver.query(domain, t) for t in ("A", "AAAA", "MX"))


def _aligned(identifier: str, author: str, mode: str, org: Callable[[str], str]) -> bool:
    """Identifier alignment (§4.10.2); `identifier` is a normalised domain.

    An Organizational Domain is always a suffix of its name, so an identifier outside the
    Author Domain's Organizational Domain cannot align, and is judged without a lookup: a
    sender cannot force a DNS failure (and a temperror) through a domain of its own.
    """
    if identifier == author:
        return True
    if mode != "r":
        return False
    author_org = org(author)
    if identifier != author_org and not identifier.endswith("." + author_org):
        return False
    return org(identifier) == author_org


# -- the check -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Identifiers:
    """The SPF and DKIM domains DMARC weighs: those that passed, and those whose result is
    temperror (a retry might turn them into a pass). Names that are no valid domain are
    left out: they can align with nothing."""

    spf_pass: tuple[str, ...] = ()
    spf_temp: tuple[str, ...] = ()
    dkim_pass: tuple[str, ...] = ()
    dkim_temp: tuple[str, ...] = ()


def _identifiers(ctx: Context) -> Identifiers:
    spf_pass: list[str] = []
    spf_temp: list[str] = []
    dkim_pass: list[str] = []
    dkim_temp: list[str] = []
    spf = ctx.outcome(SpfOutcome)
    identity = spf.dmarc_identity if spf is not None else None
    if identity is not None and (domain := normalise_domain(identity.domain)):
        if identity.result is Result.PASS:
            spf_pass.append(domain)
        elif identity.result is Result.TEMPERROR:
            spf_temp.append(domain)
    dkim = ctx.outcome(DkimOutcome)
    for sig in dkim.signatures if dkim is not None else ():
        domain = normalise_domain(sig.domain)
        if domain and sig.result is Result.PASS:
            dkim_pass.append(domain)
        elif domain and sig.result is Result.TEMPERROR:
            dkim_temp.append(domain)
    return Identifiers(tuple(spf_pass), tuple(spf_temp), tuple(dkim_pass), tuple(dkim_temp))


def arc_vouch(vouches: tuple[ArcVouch, ...], author: str, *, dkim: Callable[[str], bool],
              spf: Callable[[str], bool]) -> ArcVouch | None:
    """The newest trusted sealer's findings that speak for `author`: DMARC passed for this
    Author Domain there, or a DKIM or SPF identity passed that aligns with it (`dkim`, `spf`:
    alignment as evaluated here)."""
    for v in vouches:
        if author in v.dmarc_pass or any(dkim(d) for d in v.dkim_pass) \
                or any(spf(d) for d in v.spf_pass):
            return v
    return None


def _disposition(policy: Policy, author: str, discovery: Discovery,
                 settings: Settings) -> tuple[str, str]:
    """(policy to apply, what was published), after t=, pct= and np/sp selection."""
    rec = policy.record
    if policy.domain == author:
        chosen, tag = rec.p or "none", "p"
    elif rec.np is not None and not discovery.exists(author):
        chosen, tag = rec.np, "np"
    elif rec.sp is not None:
        chosen, tag = rec.sp, "sp"
    else:
        chosen, tag = rec.p or "none", "p"
    published = f"{tag}={chosen}" + (" t=y" if rec.t == "y" else "") + (
        f" pct={rec.pct}" if rec.pct != 100 else "")
    applied = chosen
    # t=y: one level less (§4.7); pct=0 is what t=y replaced (Appendix A.6), unless pct is
    # honoured by sampling (RFC 7489), which gives the same for 0
    testing = rec.t == "y" or (rec.pct == 0 and not settings.honour_pct)
    if testing and chosen != "none":
        applied = POLICIES[POLICIES.index(chosen) - 1]
    if settings.honour_pct and rec.pct < 100 and applied != "none" \
            and random.randrange(100) >= rec.pct:  # noqa: S311 - sampling, not security
        applied = POLICIES[POLICIES.index(applied) - 1]  # RFC 7489 §6.6.4
    return applied, published


def _result(outcome: DmarcOutcome, *, action: Action = Action.ACCEPT,
            reply: Reply | None = None, reason: str = "") -> CheckResult:
    return CheckResult(NAME, outcome.result, action=action, reply=reply,
                       reason=reason or outcome.reason, authres=(outcome.entry(),),
                       outcome=outcome)


def _refused(problem: str, action: Action, reply: Reply) -> CheckResult:
    return _result(DmarcOutcome(Result.PERMERROR, reason=problem), action=action,
                   reply=reply if action in (Action.REJECT, Action.TEMPFAIL) else None)


def evaluate_domain(author: str, ids: Identifiers, discovery: Discovery,
                    settings: Settings, arc: ArcOutcome | None = None) -> CheckResult:
    """DMARC for one Author Domain (§4.10 and §5.3), and a trusted ARC sealer's word."""
    try:
        found = discovery.policy(author)
        policy = found.record.usable() if found else None
        if found is None or policy is None:
            why = "no DMARC policy" if found is None else f"unusable record at {found.domain}"
            return _result(DmarcOutcome(Result.NONE, author, reason=why))
        found = Policy(found.domain, policy, found.org)
        aligned = [f"dkim:{d}" for d in ids.dkim_pass
                   if _aligned(d, author, policy.adkim, discovery.org)]
        aligned += [f"spf:{d}" for d in ids.spf_pass
                    if _aligned(d, author, policy.aspf, discovery.org)]
        # only an identifier that could align may make the result temporary
        pending = [f"dkim:{d}" for d in ids.dkim_temp
                   if _aligned(d, author, policy.adkim, discovery.org)]
        pending += [f"spf:{d}" for d in ids.spf_temp
                    if _aligned(d, author, policy.aspf, discovery.org)]
        applied, published = _disposition(found, author, discovery, settings)
        vouch = pending_vouch = None
        if arc is not None and arc.result in (Result.PASS, Result.TEMPERROR) \
                and arc.vouches and applied != "none" and not aligned:
            policy_now = policy
            vouch = arc_vouch(
                arc.vouches, author,
                dkim=lambda d: _aligned(d, author, policy_now.adkim, discovery.org),
                spf=lambda d: _aligned(d, author, policy_now.aspf, discovery.org))
            if arc.result is Result.TEMPERROR:  # pending: a retry may pass
                vouch, pending_vouch = None, vouch
    except DnsError as exc:
        return _result(DmarcOutcome(Result.TEMPERROR, author, reason=str(exc)),
                       action=settings.on_temperror, reply=settings.temperror_reply)
    record = found.record
    published_tags = tuple((k, v) for k, v in (
        ("p", record.p or "none"), ("sp", record.sp or ""), ("np", record.np or ""),
        ("adkim", record.adkim), ("aspf", record.aspf), ("testing", record.t),
        ("discovery_method", "psl" if settings.psl is not None else "treewalk"),
        # the record is the sender's: a 60 KB rua must not be copied into every stored row
        ("rua", ",".join(u for u in record.rua[:MAX_RUA] if len(u) <= 256))) if v)
    evaluated = DmarcOutcome(Result.PASS, author, found.domain, published, applied,
                             tuple(aligned), record=published_tags)
    if aligned:
        return _result(evaluated, reason=f"aligned {', '.join(aligned)}")
    if vouch is not None:
        return _result(dataclasses.replace(evaluated, result=Result.FAIL, applied="none",
                                           arc_override=vouch.sealer),
                       reason=f"{author}: {published} at {found.domain}, accepted by ARC "
                              f"from {vouch.sealer} (i={vouch.instance})")
    if pending:
        # a retry may pass; but where the policy would not act on a fail, nothing waits
        action = settings.on_temperror if applied != "none" else Action.ACCEPT
        return _result(dataclasses.replace(evaluated, result=Result.TEMPERROR),
                       action=action, reply=settings.temperror_reply,
                       reason=f"no aligned pass; temperror for {', '.join(pending)}")
    if pending_vouch is not None:
        return _result(dataclasses.replace(evaluated, result=Result.TEMPERROR),
                       action=settings.on_temperror, reply=settings.temperror_reply,
                       reason=f"no aligned pass; ARC: a key of trusted sealer "
                              f"{pending_vouch.sealer} could not be looked up")
    failed = dataclasses.replace(evaluated, result=Result.FAIL)
    reason = f"{author}: {published} at {found.domain}, applied {applied}"
    if applied == "reject":
        action = Action.QUARANTINE if author in settings.never_reject else settings.reject_as
        reply = Reply(settings.reject_reply.code, settings.reject_reply.status,
                      f"{settings.reject_reply.text} {author} ({published})")
        return _result(failed, action=action, reply=reply, reason=reason)
    if applied == "quarantine":
        return _result(failed, action=Action.QUARANTINE, reason=reason)
    return _result(failed, reason=reason)


def _strictest(results: list[CheckResult]) -> CheckResult:
    """§11.5: each Author Domain evaluated, the strictest outcome applies."""
    worst = max(results, key=lambda r: (r.action.severity, r.result is Result.FAIL))
    entries = tuple(e for r in results for e in r.authres)
    return dataclasses.replace(worst, authres=entries,
                               reason="; ".join(r.reason for r in results))


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Evaluate DMARC for `tx` (see the module docstring)."""
    found = authors(tx)
    if found.problem is AuthorProblem.MULTIPLE_FIELDS:
        return _refused(found.reason, settings.on_multiple_from, settings.multiple_from_reply)
    if found.problem is AuthorProblem.MALFORMED:
        return _refused(found.reason, settings.on_malformed_from,
                        settings.malformed_from_reply)
    if found.problem is not None:  # no From, or none naming a domain: DMARC does not apply
        return _refused(found.reason, settings.on_permerror, settings.reject_reply)
    domains = found.domains
    if len(domains) > 1 and (settings.multiple_author_domains == "refuse"
                             or len(domains) > settings.max_author_domains):
        return _refused(f"{len(domains)} author domains", settings.on_multiple_from,
                        settings.multiple_from_reply)
    discovery = Discovery(ctx.dns, settings)
    ids = _identifiers(ctx)
    arc = ctx.outcome(ArcOutcome)
    results = [evaluate_domain(d, ids, discovery, settings, arc) for d in domains]
    for r in results:
        if isinstance(r.outcome, DmarcOutcome) and r.outcome.arc_override:
            log.info("qid=%s dmarc: %s (%s) accepted by ARC from %s", tx.queue_id or "-",
                     r.outcome.author_domain, r.outcome.published, r.outcome.arc_override)
            if ctx.metrics is not None:
                ctx.metrics.arc_overrides.labels(sealer=r.outcome.arc_override).inc()
    return results[0] if len(results) == 1 else _strictest(results)


class Dmarc(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.INBOUND})
    requires = ("spf", "dkim")  # their outcomes are its inputs
    after = ("arc",)  # its outcome too, when it runs: trusted sealers may vouch
    uses = frozenset({Service.DNS})


CHECK = Dmarc(Settings.load, check)
