"""dkim: which DKIM signatures of an inbound message verify? (RFC 6376, RFC 8463, RFC 8301)

Every signature up to `max_signatures` is verified with dkimpy, its key fetched through
mailward's resolver; later ones are reported `policy` (not verified). Results per signature
(RFC 8601 §2.7.1), each in Authentication-Results with header.d, header.s, header.a and
header.b (the first 8 characters of b=):
- pass: verified. A signature whose l= leaves part of the body unsigned is `policy` instead,
  unless `accept_partial_body` (RFC 6376 §8.2).
- fail: the signature or body hash does not verify; or it cannot be valid by RFC 8301:
  rsa-sha1, or an RSA key under 1024 bits. A key under `min_key_bits` but >= 1024 is `policy`.
- neutral: the signature field is malformed (tag syntax, missing tags, bad base64, v≠1,
  unknown algorithm).
- permerror: no key, a revoked key (empty p=), a malformed key record, a key type that does not
  match a=, a key h= that excludes the hash, t=s with an i= below d=, an h= without From
  (RFC 6376 §5.4), an expired x=.
- temperror: the key lookup timed out or failed (never `fail`).
dkimpy 1.1.8 lets rsa-sha1, From-less h=, the key's h= and t=s, and up to 10 hours of expired x=
through; mailward checks those itself before the crypto.

Hostile input (issue 7): a signature field is bounded before dkimpy sees it (size, white space
runs, base64 b=/bh=, digit counts of t=/x=/l=), which keeps dkimpy's regular expressions linear;
the body hash is computed by mailward, streamed from the spool in linear time and bounded
memory (core/bodyhash.py), and dkimpy verifies the header signature only; any exception a
library raises for one signature is that signature's permerror, never the check's.

The check itself never refuses mail: DKIM feeds DMARC. Inbound mail only.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
from dataclasses import dataclass

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.dkimglue import (
    ALGORITHMS,
    MIN_RSA_BITS,
    WSP,
    HeaderDKIM,
    body_hashes,
    body_key,
    header_dkim,
    judge_key,
    shape_problem,
    tag_problem,
    text,
)
from mailward.core.ini import Section
from mailward.core.outcomes import DkimOutcome, DkimSignature
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import CheckResult, Result
from mailward.services import dkimcrypto
from mailward.services.dns import BoundResolver, DnsError

dkimcrypto.install()  # dkimpy's RSA through OpenSSL (services/dkimcrypto.py)

NAME = "dkim"
FIELD = "DKIM-Signature"
FIELD_BYTES = FIELD.lower().encode()
SIGNED_SPLIT = re.compile(rb"\s*:\s*")  # h= as dkimpy splits it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """[check.dkim]"""

    max_signatures: int = 5
    min_key_bits: int = 1024
    accept_partial_body: bool = False
    max_message_size: int = 64 * 1024 * 1024

    @classmethod
    def load(cls, sec: Section) -> Settings:
        return cls(
            max_signatures=sec.integer("max_signatures", cls.max_signatures, minimum=1,
                                       maximum=50),
            min_key_bits=sec.integer("min_key_bits", cls.min_key_bits, minimum=MIN_RSA_BITS,
                                     maximum=16384),
            accept_partial_body=sec.boolean("accept_partial_body", cls.accept_partial_body),
            max_message_size=sec.size("max_message_size", cls.max_message_size),
        )


Problem = tuple[Result, str]


def _signature_problem(tags: dict[bytes, bytes], now: float) -> Problem | None:
    """What makes the signature field unusable before any key or crypto, or None."""
    malformed = tag_problem(tags)
    if malformed:
        return Result.NEUTRAL, malformed
    if tags.get(b"a") == b"rsa-sha1":
        return Result.FAIL, "rsa-sha1 is not acceptable (RFC 8301)"
    try:
        dkimpy.validate_signature_fields(tags)
    except dkimpy.ValidationError as exc:
        # dkimpy allows 10 hours past x=; expiry is judged below, exactly
        if b"x" not in tags or not str(exc).startswith("x= value is past"):
            return Result.NEUTRAL, f"malformed signature: {exc}"
    if tags[b"a"] not in ALGORITHMS:
        return Result.NEUTRAL, f"unknown algorithm {text(tags[b'a'])}"
    if b"from" not in [h.strip().lower() for h in tags[b"h"].split(b":")]:
        return Result.PERMERROR, "h= does not sign From (RFC 6376 §5.4)"
    if b"x" in tags and int(tags[b"x"]) < now:
        return Result.PERMERROR, "signature expired (x=)"
    return None


def _key(tags: dict[bytes, bytes], name: str, *, resolver: BoundResolver,
         settings: Settings) -> tuple[bytes, Problem | None]:
    """The key record for the signature, or why it cannot verify it."""
    try:
        record = resolver.dkim_txt(name)
    except DnsError as exc:
        return b"", (Result.TEMPERROR, f"key lookup failed: {exc}")
    if record is None:
        return b"", (Result.PERMERROR, f"no key at {name}")
    bits, problem = judge_key(tags, name, record)
    if problem:
        return record, (Result.PERMERROR, problem)
    if tags[b"a"].startswith(b"rsa") and bits < MIN_RSA_BITS:
        return record, (Result.FAIL, f"RSA key of {bits} bits (RFC 8301)")
    if tags[b"a"].startswith(b"rsa") and bits < settings.min_key_bits:
        return record, (Result.POLICY, f"RSA key of {bits} bits < min_key_bits")
    return record, None


@dataclass
class _Pending:
    """A signature that passed every check but the cryptography."""

    index: int
    sig: DkimSignature
    tags: dict[bytes, bytes]
    record: bytes


def _prepare(index: int, value: str, *, resolver: BoundResolver, settings: Settings,
             now: float) -> DkimSignature | _Pending:
    """Everything before the body hash and the crypto: shape, tags, key."""
    shape = shape_problem(value)
    if shape:
        return DkimSignature(Result.NEUTRAL, shape)
    try:
        tags = parse_tag_value(value.encode("utf-8", "surrogateescape"))
    except InvalidTagValueList as exc:
        return DkimSignature(Result.NEUTRAL, f"malformed signature: {exc}")
    sig = DkimSignature(Result.NONE, "", domain=text(tags.get(b"d", b"")),
                        selector=text(tags.get(b"s", b"")),
                        algorithm=text(tags.get(b"a", b"")),
                        b=text(WSP.sub(b"", tags.get(b"b", b""))))
    problem = _signature_problem(tags, now)
    if problem is None:
        record, problem = _key(tags, f"{sig.selector}._domainkey.{sig.domain}",
                               resolver=resolver, settings=settings)
    if problem is not None:
        return dataclasses.replace(sig, result=problem[0], reason=problem[1])
    return _Pending(index, sig, tags, record)


def _crypto(message: HeaderDKIM, p: _Pending, body: BodyHash, settings: Settings) -> Problem:
    """The body hash (ours), then the header signature (dkimpy); then judge l=.

    dkimpy is handed the tags `_prepare` parsed and validated, and the signature field as
    received (which it hashes with b= emptied): its own `verify` would parse and validate
    the field a second time."""
    if body.digest() != base64.b64decode(WSP.sub(b"", p.tags[b"bh"])):
        return Result.FAIL, "body hash mismatch"
    fields = [f for f in message.headers if f[0].lower() == FIELD_BYTES]
    signed = [name.lower() for name in SIGNED_SPLIT.split(p.tags[b"h"])]
    try:
        ok = message.verify_sig(p.tags, signed, fields[p.index],
                                lambda *_a, **_k: p.record)
    except dkimpy.ValidationError as exc:
        return Result.FAIL, str(exc).split(" (")[0]
    except (dkimpy.DKIMException, ValueError, TypeError, IndexError) as exc:
        # malformed input dkimpy did not anticipate: unrecoverable for this signature
        return Result.PERMERROR, f"cannot verify: {exc}"
    if not ok:
        return Result.FAIL, "signature did not verify"
    if body.limit is not None and not settings.accept_partial_body \
            and body.limit < body.length:
        return Result.POLICY, f"l= signs {body.limit} of {body.length} body bytes"
    return Result.PASS, ""


def _contained(index: int, exc: Exception) -> DkimSignature:
    """One signature's permerror for an exception no check anticipated (never the check's)."""
    log.warning("dkim: signature %d: %s while verifying", index + 1, type(exc).__name__)
    return DkimSignature(Result.PERMERROR, f"cannot verify: internal error "
                                           f"({type(exc).__name__})")


def verify_all(tx: Transaction, values: list[str], *, resolver: BoundResolver,
               settings: Settings) -> list[DkimSignature]:
    """Verify the first `max_signatures` signatures; the rest are `policy`."""
    now = time.time()
    out: list[DkimSignature | _Pending] = []
    for i, value in enumerate(values):
        if i >= settings.max_signatures:
            out.append(DkimSignature(Result.POLICY, "over max_signatures: not verified"))
            continue
        try:
            out.append(_prepare(i, value, resolver=resolver, settings=settings, now=now))
        except Exception as exc:  # contained per signature, logged
            out.append(_contained(i, exc))
    pending = [p for p in out if isinstance(p, _Pending)]
    if not pending:
        return [s for s in out if isinstance(s, DkimSignature)]
    names = {FIELD.lower().encode()} | {n.strip().lower() for p in pending
                                        for n in p.tags.get(b"h", b"").split(b":")}
    message = header_dkim(tx, names)
    hashes = body_hashes(tx.body, {body_key(p.tags) for p in pending})
    done: list[DkimSignature] = []
    for item in out:
        if isinstance(item, DkimSignature):
            done.append(item)
            continue
        try:
            problem = _crypto(message, item, hashes[body_key(item.tags)], settings)
            done.append(dataclasses.replace(item.sig, result=problem[0], reason=problem[1]))
        except Exception as exc:  # contained per signature, logged
            done.append(_contained(item.index, exc))
    return done


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Verify the signatures of `tx` (see the module docstring)."""
    fields = tx.get_all(FIELD)
    if not fields:
        outcome = DkimOutcome()
        return CheckResult(NAME, Result.NONE, reason="no signature",
                           authres=outcome.entries(), outcome=outcome)
    size = sum(len(h.name) + len(h.value) for h in tx.headers) + (
        tx.body.size if tx.body else 0)
    if size > settings.max_message_size:
        sigs = [DkimSignature(Result.POLICY,
                              "message larger than max_message_size: not verified")
                for _ in fields]
    else:
        sigs = verify_all(tx, [h.value for h in fields], resolver=ctx.dns, settings=settings)
    outcome = DkimOutcome(tuple(sigs))
    results = {s.result for s in sigs}
    overall = next((r for r in (Result.PASS, Result.TEMPERROR, Result.FAIL, Result.POLICY,
                                Result.PERMERROR, Result.NEUTRAL) if r in results), Result.NONE)
    reason = "; ".join(f"{s.domain or '?'}: {s.result}" + (f" ({s.reason})" if s.reason else "")
                       for s in sigs)
    return CheckResult(NAME, overall, reason=reason, authres=outcome.entries(),
                       outcome=outcome)


class Dkim(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.INBOUND})
    uses = frozenset({Service.DNS})


CHECK = Dkim(Settings.load, check)
