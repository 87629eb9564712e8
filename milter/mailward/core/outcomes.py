"""What checks find, as typed data that later checks read (DMARC, and later ARC and reports).

A check attaches its outcome to its `CheckResult.outcome`; a later check finds it by type with
`Context.outcome(SpfOutcome)`. These types are the whole interface between checks: no check
imports another, and none parses another's Authentication-Results text. Each outcome also
gives its Authentication-Results entries (RFC 8601), which `authres` alone renders.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mailward.core.verdict import AuthResEntry, Result


class SpfScope(enum.StrEnum):
    """Which SPF identity was checked (RFC 7208 §2.3, §2.4)."""

    MAILFROM = "mailfrom"
    HELO = "helo"


@dataclass(frozen=True, slots=True)
class SpfIdentity:
    """One SPF evaluation: the identity as given, its domain, and the result."""

    scope: SpfScope
    identity: str  # the MAIL FROM address, or the HELO name
    domain: str
    result: Result
    reason: str = ""

    def entry(self) -> AuthResEntry:
        return AuthResEntry("spf", self.result,
                            properties=(("smtp", str(self.scope), self.identity),))


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """The SPF identities checked for one message.

    `dmarc_identity` is the one DMARC uses (RFC 9989 §4.4): the MAIL FROM identity, or the HELO
    identity for the null sender.
    """

    identities: tuple[SpfIdentity, ...] = ()

    def get(self, scope: SpfScope) -> SpfIdentity | None:
        return next((i for i in self.identities if i.scope is scope), None)

    @property
    def dmarc_identity(self) -> SpfIdentity | None:
        return self.get(SpfScope.MAILFROM) or self.get(SpfScope.HELO)

    def entries(self) -> tuple[AuthResEntry, ...]:
        return tuple(i.entry() for i in self.identities)


@dataclass(frozen=True, slots=True)
class DkimSignature:
    """The outcome for one DKIM-Signature field (RFC 6376 §3.5 tags d=, s=, a=, b=)."""

    result: Result
    reason: str = ""
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""

    def entry(self) -> AuthResEntry:
        props = tuple(("header", k, v) for k, v in (
            ("d", self.domain), ("s", self.selector), ("a", self.algorithm), ("b", self.b[:8]))
            if v)
        reason = "" if self.result is Result.PASS else self.reason
        return AuthResEntry("dkim", self.result, reason=reason, properties=props)


@dataclass(frozen=True, slots=True)
class DkimOutcome:
    """Every DKIM signature of the message, in header order."""

    signatures: tuple[DkimSignature, ...] = ()

    @property
    def passing_domains(self) -> tuple[str, ...]:
        return tuple(s.domain for s in self.signatures if s.result is Result.PASS and s.domain)

    @property
    def temperror(self) -> bool:
        return any(s.result is Result.TEMPERROR for s in self.signatures)

    def entries(self) -> tuple[AuthResEntry, ...]:
        if not self.signatures:
            return (AuthResEntry("dkim", Result.NONE),)
        return tuple(s.entry() for s in self.signatures)


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The DMARC evaluation of the Author Domain (RFC 9989 §4.10).

    `published` names the policy as published (e.g. `p=reject t=y`), `applied` the disposition
    after t=, pct= and np/sp selection, `aligned` the identifiers that aligned (`dkim:DOMAIN`,
    `spf:DOMAIN`). Empty strings where evaluation stopped before knowing them.
    """

    result: Result
    author_domain: str = ""
    policy_domain: str = ""
    published: str = ""
    applied: str = ""
    aligned: tuple[str, ...] = ()
    reason: str = ""

    def entry(self) -> AuthResEntry:
        props: tuple[tuple[str, str, str], ...] = ()
        if self.author_domain:
            props += (("header", "from", self.author_domain),)
        if self.applied:
            props += (("policy", "dmarc", self.applied),)
        reason = self.published if self.result is Result.FAIL else ""
        if self.result is Result.PERMERROR:
            reason = self.reason
        return AuthResEntry("dmarc", self.result, reason=reason, properties=props)

