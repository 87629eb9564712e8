"""arc: is the message's Authenticated Received Chain intact? (RFC 8617)

Inbound mail only. Validation follows RFC 8617 §5.2, every key fetched through mailward's
resolver. Results, in Authentication-Results as `arc=RESULT (i=N) smtp.remote-ip=CLIENT
header.oldest-pass=M` (RFC 8617 §7.2):
- none: no ARC header field.
- pass: the ARC sets are complete and numbered 1..N (N <= 50, §4.2.1), the ARC-Seal of i=1
  says cv=none and every later one cv=pass, the newest ARC-Message-Signature (AMS) and every
  ARC-Seal (AS) verify. oldest-pass is the lowest instance from which every AMS still
  verifies, 0 when all do (step 5): below it, a hop changed what earlier sealers signed.
- fail, with the reason: more than 50 sets, a missing, duplicate or gapped instance, an i=
  that is no number from 1 to 50, a field over its bound, a malformed tag list, a wrong or
  failing cv=, an AMS that signs ARC-Seal, an AS with h=, a key that is missing, revoked,
  malformed or under 1024 bits (RFC 8301), a body hash or signature that does not verify.
- temperror: a key lookup failed before anything failed for good. RFC 8617 registers none,
  pass and fail only, so Authentication-Results says `arc=fail reason="temperror: ..."`
  (sealing takes cv= from that entry, and a chain we could not validate must not be sealed
  onward as a pass); the typed outcome, the log and the metrics say temperror. As with a
  DKIM key (checks/dkim.py), a DNS failure is never read as a forgery.

The check never refuses mail: DMARC reads its `ArcOutcome`.

Hostile input (as checks/dkim.py, with the pieces it shares in core/dkimglue.py): at most
150 ARC fields and 256 KiB of them in all; each AMS and AS bounded in size and white space
before dkimpy parses it, each ARC-Authentication-Results (AAR) to 16 KiB and read by our own
linear parser (core/authresults.py); the body hashes are computed by mailward, streamed from
the spool; dkimpy verifies header signatures only, with the fields it signs selected by
instance, not by position; verification stops at the first failure, so a forged chain costs
one key lookup per set at most. An exception a library raises for one signature is that
signature's failure (logged), never the check's.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from mailward.core import authresults
from mailward.core.addresses import normalise_domain
from mailward.core.arcsets import (
    AAR,
    AMS,
    AS,
    ArcSet,
    Broken,
    read_sets,
    signed_names,
)
from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.dkimglue import (
    MIN_RSA_BITS,
    WSP,
    BodyKey,
    HeaderDKIM,
    body_hashes,
    body_key,
    header_dkim,
    header_fields,
    judge_key,
    tag_problem,
    text,
)
from mailward.core.ini import Section
from mailward.core.outcomes import ArcOutcome, ArcVouch
from mailward.core.transaction import Direction, Header, Stage, Transaction
from mailward.core.verdict import CheckResult, Result
from mailward.services import dkimcrypto
from mailward.services.dns import BoundResolver, DnsError

dkimcrypto.install()  # dkimpy's RSA through OpenSSL (services/dkimcrypto.py)

NAME = "arc"
ARC_C = b"relaxed/relaxed"  # ARC's canonicalization (AS always, AMS when c= is absent)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """[check.arc]"""

    trusted_sealers: tuple[str, ...] = ()

    @classmethod
    def load(cls, sec: Section) -> Settings:
        return cls(trusted_sealers=sec.domains("trusted_sealers"))


class Unknown(Exception):
    """A key lookup failed: the chain can be neither passed nor failed now."""


def _validate_tags(s: ArcSet) -> None:
    """What can be judged of one set without DNS or cryptography."""
    for kind, mandatory in ((AMS, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"]),
                            (AS, [b"i", b"a", b"b", b"cv", b"d", b"s"])):
        tags = s.tags[kind]
        missing = [text(t) + "=" for t in mandatory if t not in tags]
        if missing:
            raise Broken(f"{kind} i={s.instance}: no {', '.join(missing)}")
        problem = tag_problem(tags)
        if problem:
            raise Broken(f"{kind} i={s.instance}: {problem}")
        try:
            dkimpy.validate_signature_fields(tags, mandatory, True)
        except dkimpy.ValidationError as exc:
            raise Broken(f"{kind} i={s.instance}: {str(exc).split(' (')[0]}") from None
    ams, seal = s.tags[AMS], s.tags[AS]
    if b"arc-seal" in signed_names(ams):
        raise Broken(f"{AMS} i={s.instance} signs ARC-Seal (RFC 8617 §4.1.2)")
    try:
        CanonicalizationPolicy.from_c_value(ams.get(b"c", ARC_C))
    except InvalidCanonicalizationPolicyError:
        raise Broken(f"{AMS} i={s.instance}: invalid c=") from None
    if b"h" in seal:
        raise Broken(f"{AS} i={s.instance} has h= (RFC 8617 §4.1.3)")


def _cv(sets: list[ArcSet]) -> None:
    """§5.2 step 2 and 3.3: the newest seal did not see a failure, and cv= is none at i=1 and
    pass above."""
    if not sets:
        return
    top = sets[-1]
    if top.tags[AS][b"cv"].lower() == b"fail":
        raise Broken(f"{AS} i={top.instance} says cv=fail: an earlier hop found the chain "
                     "broken")
    for s in sets:
        expected = b"none" if s.instance == 1 else b"pass"
        cv = s.tags[AS][b"cv"]
        if cv != expected:
            raise Broken(f"{AS} i={s.instance} says cv={text(cv)}, not {text(expected)}")


def _parsed(h: Header) -> tuple[bytes, bytes]:
    """A field as dkimpy's parser gives it (value with its CRLFs), for the signature field."""
    ((name, value),) = header_fields(((h.name, h.value),))
    return name, value


class Verifier:
    """The cryptography of one chain: keys through our resolver, body hashes from the
    spool, header signatures by dkimpy."""

    def __init__(self, tx: Transaction, sets: list[ArcSet], resolver: BoundResolver) -> None:
        self.sets = {s.instance: s for s in sets}
        self.resolver = resolver
        names = {n for s in sets for n in signed_names(s.tags[AMS])}
        self.ams_message = header_dkim(tx, names)
        # every ARC field, the newest set first: dkimpy picks signed fields bottom-up by
        # name, so an AS of instance k, counting k AARs, k AMSs and k-1 ASs, gets exactly
        # the sets 1..k in instance order (RFC 8617 §5.1.1) wherever they stood
        ordered = [s.fields[k] for s in reversed(sets) for k in (AS, AMS, AAR)]
        self.seal_message = HeaderDKIM(None, minkey=MIN_RSA_BITS)
        self.seal_message.headers = header_fields((h.name, h.value) for h in ordered)
        self.all_seal_headers = list(self.seal_message.headers)
        keys: set[BodyKey] = {body_key(s.tags[AMS], ARC_C) for s in sets}
        self.hashes: dict[BodyKey, BodyHash] = body_hashes(tx.body, keys)
        self.unresolved = ""  # the d= of a key that could not be looked up

    def _key(self, tags: dict[bytes, bytes]) -> bytes:
        name = f"{text(tags[b's'])}._domainkey.{text(tags[b'd'])}"
        try:
            record = self.resolver.dkim_txt(name)
        except DnsError as exc:
            self.unresolved = text(tags[b"d"]).lower().rstrip(".")
            raise Unknown(f"key lookup failed: {exc}") from None
        if record is None:
            raise Broken(f"no key at {name}")
        bits, problem = judge_key(tags, name, record)
        if problem:
            raise Broken(problem)
        if bits < MIN_RSA_BITS:
            raise Broken(f"RSA key of {bits} bits (RFC 8301)")
        return record

    def ams(self, instance: int) -> None:
        """Verify the AMS of `instance`; Broken or Unknown when it does not."""
        s = self.sets[instance]
        tags = s.tags[AMS]
        record = self._key(tags)
        body = self.hashes[body_key(tags, ARC_C)]
        if body.digest() != base64.b64decode(WSP.sub(b"", tags[b"bh"])):
            raise Broken("body hash mismatch")
        if body.limit is not None and body.limit < body.length:
            raise Broken(f"l= signs {body.limit} of {body.length} body bytes")
        sig = dict(tags)
        sig.setdefault(b"c", ARC_C)
        self._verify(self.ams_message, sig, signed_names(tags), _parsed(s.fields[AMS]), record)

    def seal(self, instance: int) -> None:
        """Verify the AS of `instance` over the sets 1..instance; Broken or Unknown."""
        s = self.sets[instance]
        tags = s.tags[AS]
        record = self._key(tags)
        sig = dict(tags)
        sig[b"c"] = ARC_C
        # only the fields from this instance's AMS down: dkimpy canonicalizes all it holds
        newest = len(self.sets)
        self.seal_message.headers = self.all_seal_headers[3 * (newest - instance) + 1:]
        include = [b"arc-authentication-results", b"arc-message-signature",
                   b"arc-seal"] * (instance - 1) + [b"arc-authentication-results",
                                                    b"arc-message-signature"]
        self._verify(self.seal_message, sig, include, _parsed(s.fields[AS]), record)

    @staticmethod
    def _verify(message: HeaderDKIM, sig: dict[bytes, bytes], include: list[bytes],
                sig_header: tuple[bytes, bytes], record: bytes) -> None:
        dnsfunc: Callable[..., bytes] = lambda *_a, **_k: record  # noqa: E731
        try:
            ok = message.verify_sig(sig, include, sig_header, dnsfunc)
        except dkimpy.DKIMException as exc:
            raise Broken(str(exc).split(" (")[0]) from None
        except (ValueError, TypeError, IndexError) as exc:
            raise Broken(f"cannot verify: {exc}") from None
        if not ok:
            raise Broken("signature did not verify")


def _guarded(what: str, step: Callable[[int], None], instance: int) -> None:
    """One signature: its failure names it; an exception nobody anticipated is its failure
    too (logged), never the check's."""
    try:
        step(instance)
    except Broken as exc:
        raise Broken(f"{what} i={instance}: {exc}") from None
    except Unknown as exc:
        raise Unknown(f"{what} i={instance}: {exc}") from None
    except Exception as exc:  # contained per signature, logged
        log.warning("arc: %s i=%d: %s while verifying", what, instance, type(exc).__name__)
        raise Broken(f"{what} i={instance}: cannot verify: internal error "
                     f"({type(exc).__name__})") from None


def _vouch(s: ArcSet) -> ArcVouch | None:
    """What the AAR of `s` recorded as passing (see ArcVouch), or None: nothing."""
    parsed = authresults.parse_aar(s.fields[AAR].value)
    if parsed is None:
        return None
    found: dict[str, list[str]] = {"dmarc": [], "dkim": [], "spf": []}
    for r in parsed[1].results:
        if r.result != "pass" or r.method not in found:
            continue
        if r.method == "dmarc":
            name = r.get("header.from")
        elif r.method == "dkim":
            name = r.get("header.d") or r.get("header.i").rpartition("@")[2]
        else:  # smtp.mfrom: the draft's name, still written by some
            name = (r.get("smtp.mailfrom") or r.get("smtp.mfrom")).rpartition("@")[2]
        domain = normalise_domain(name) if name else None
        if domain:
            found[r.method].append(domain)
    if not any(found.values()):
        return None
    return ArcVouch(s.sealer(), s.instance, tuple(found["dmarc"]), tuple(found["dkim"]),
                    tuple(found["spf"]))


def vouches(sets: list[ArcSet], trusted: tuple[str, ...],
            oldest_pass: int | None) -> tuple[ArcVouch, ...]:
    """The findings of trusted sealers, newest first. For a passing chain (`oldest_pass`
    known) only sealers whose AMS still verifies; always only sealers whose AMS signs From
    (RFC 6376 §5.4), so their findings are about this message's author."""
    out = []
    for s in reversed(sets):
        if s.sealer() not in trusted or b"from" not in signed_names(s.tags[AMS]):
            continue
        if oldest_pass and s.instance < oldest_pass:
            continue  # a later hop changed what this sealer signed
        vouch = _vouch(s)
        if vouch is not None:
            out.append(vouch)
    return tuple(out)


def validate(tx: Transaction, resolver: BoundResolver,
             trusted: tuple[str, ...] = ()) -> ArcOutcome:
    """RFC 8617 §5.2 for `tx` (see the module docstring), and the `trusted` sealers'
    vouches."""
    remote_ip = str(tx.client_ip) if tx.client_ip else ""
    try:
        sets = read_sets(tx.headers)
    except Broken as exc:
        return ArcOutcome(Result.FAIL, str(exc), remote_ip=remote_ip)
    if not sets:
        return ArcOutcome(Result.NONE, "no ARC sets")
    n = len(sets)
    sealers: tuple[str, ...] = ()
    verifier: Verifier | None = None
    try:
        for s in sets:
            _validate_tags(s)
        _cv(sets)
        sealers = tuple(s.sealer() for s in sets)
        verifier = Verifier(tx, sets, resolver)
        _guarded(AMS, verifier.ams, n)  # step 4
        for i in range(n, 0, -1):  # step 6
            _guarded(AS, verifier.seal, i)
    except Broken as exc:
        return ArcOutcome(Result.FAIL, str(exc), n, None, remote_ip, sealers)
    except Unknown as exc:
        # a retry may pass; only when the key that could not be looked up is a trusted
        # sealer's may that keep DMARC waiting (a sender's own slow DNS never does)
        unresolved = verifier.unresolved if verifier is not None else ""
        pending = vouches(sets, trusted, None) if unresolved in trusted else ()
        return ArcOutcome(Result.TEMPERROR, str(exc), n, None, remote_ip, sealers, pending)
    oldest = _oldest_pass(verifier, n)
    return ArcOutcome(Result.PASS, "", n, oldest, remote_ip, sealers,
                      vouches(sets, trusted, oldest))


def _oldest_pass(verifier: Verifier, n: int) -> int:
    """§5.2 step 5, for a passing chain only (it costs one AMS per instance): the lowest
    instance from which every AMS verifies, 0 when all do."""
    for i in range(n - 1, 0, -1):
        try:
            _guarded(AMS, verifier.ams, i)
        except (Broken, Unknown):
            return i + 1
    return 0


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Validate the ARC chain of `tx` (see the module docstring)."""
    outcome = validate(tx, ctx.dns, settings.trusted_sealers)
    if outcome.result is Result.PASS:
        reason = f"{outcome.instances} set(s) sealed by {', '.join(outcome.sealers)}, " \
                 f"oldest-pass {outcome.oldest_pass}"
    else:
        reason = outcome.reason
    if outcome.vouches:
        reason += "; trusted: " + ", ".join(f"{v.sealer} (i={v.instance})"
                                            for v in outcome.vouches)
    return CheckResult(NAME, outcome.result, reason=reason, authres=(outcome.entry(),),
                       outcome=outcome)


class Arc(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.INBOUND})
    uses = frozenset({Service.DNS})


CHECK = Arc(Settings.load, check)
