"""What checks find, as typed data that later checks read (DMARC, ARC, and later reports).

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
class ArcVouch:
    """What a trusted sealer's ARC-Authentication-Results recorded as passing: the Author
    Domains of `dmarc=pass`, the `header.d` of `dkim=pass`, the `smtp.mailfrom` domains of
    `spf=pass` (normalised). The `arc` check publishes one only for a sealer named in
    `[check.arc] trusted_sealers` whose seal, and every seal before it, verifies, whose
    ARC-Message-Signature signs From and still verifies (nothing it signed changed since),
    in a chain that passes; or, as a pending vouch, when a key of a trusted sealer could not
    be looked up. Whether it speaks for the Author Domain is DMARC's to judge (alignment)."""

    sealer: str
    instance: int
    dmarc_pass: tuple[str, ...] = ()
    dkim_pass: tuple[str, ...] = ()
    spf_pass: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ArcOutcome:
    """The ARC chain of the message (RFC 8617 §5.2), as the `arc` check validated it.

    `result` is none (no ARC fields), pass, fail or temperror (a key lookup failed before
    anything failed for good). `instances` counts the ARC sets, `oldest_pass` is the lowest
    instance from which every ARC-Message-Signature still verifies (0: all of them; known for
    a passing chain only), `sealers` the ARC-Seal d= of each instance, the first one first.
    `vouches` are the trusted sealers' findings DMARC may honour, newest first: for a
    passing chain, or (pending) for a temperror that a retry may turn into a pass.
    """

    result: Result
    reason: str = ""
    instances: int = 0
    oldest_pass: int | None = None
    remote_ip: str = ""
    sealers: tuple[str, ...] = ()
    vouches: tuple[ArcVouch, ...] = ()

    def entry(self) -> AuthResEntry:
        """`arc=pass (i=2) smtp.remote-ip=... header.oldest-pass=0` (RFC 8617 §7.2).

        RFC 8617 registers none, pass and fail: a temperror is written `arc=fail` with the
        reason, and a chain we could not validate is never sealed onward as a pass (sealing
        takes cv= from this entry)."""
        if self.result is Result.NONE:
            return AuthResEntry("arc", Result.NONE)
        props: tuple[tuple[str, str, str], ...] = ()
        if self.remote_ip:
            props += (("smtp", "remote-ip", self.remote_ip),)
        if self.result is Result.PASS and self.oldest_pass is not None:
            props += (("header", "oldest-pass", str(self.oldest_pass)),)
        result, reason = self.result, self.reason
        if result is Result.TEMPERROR:
            result, reason = Result.FAIL, f"temperror: {reason}"
        return AuthResEntry("arc", result, reason="" if result is Result.PASS else reason,
                            properties=props,
                            comment=f"i={self.instances}" if self.instances else "")


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The DMARC evaluation of the Author Domain (RFC 9989 §4.10).

    `published` names the policy as published (e.g. `p=reject t=y`), `applied` the disposition
    after t=, pct= and np/sp selection, `aligned` the identifiers that aligned (`dkim:DOMAIN`,
    `spf:DOMAIN`). Empty strings where evaluation stopped before knowing them.
    `arc_override` names the trusted ARC sealer whose results overrode a failing disposition
    (RFC 9990's `trusted_forwarder`): the result stays fail, `applied` becomes none.
    `record` is the policy record as published, for aggregate reports (RFC 9990 §2.1,
    `policy_published`): p, sp, np, adkim, aspf, testing, discovery_method and rua.
    """

    result: Result
    author_domain: str = ""
    policy_domain: str = ""
    published: str = ""
    applied: str = ""
    aligned: tuple[str, ...] = ()
    reason: str = ""
    arc_override: str = ""
    record: tuple[tuple[str, str], ...] = ()

    def entry(self) -> AuthResEntry:
        props: tuple[tuple[str, str, str], ...] = ()
        if self.author_domain:
            props += (("header", "from", self.author_domain),)
        if self.applied:
            props += (("policy", "dmarc", self.applied),)
        reason = self.published if self.result is Result.FAIL else ""
        if self.arc_override:
            reason = f"{self.published}; accepted by ARC from {self.arc_override}"
        if self.result is Result.PERMERROR:
            reason = self.reason
        return AuthResEntry("dmarc", self.result, reason=reason, properties=props)

