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
import binascii
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context, ModuleCheck, Service
from mailward.core.ini import Section
from mailward.core.outcomes import DkimOutcome, DkimSignature
from mailward.core.transaction import Body, Direction, Stage, Transaction, render_message
from mailward.core.verdict import CheckResult, Result
from mailward.services import dkimcrypto
from mailward.services.dns import BoundResolver, DnsError

dkimcrypto.install()  # dkimpy's RSA through OpenSSL (services/dkimcrypto.py)

NAME = "dkim"
MIN_RSA_BITS = 1024  # RFC 8301 §3.2
ALGORITHMS = {b"rsa-sha256": (b"rsa", b"sha256"), b"ed25519-sha256": (b"ed25519", b"sha256")}
FIELD = "DKIM-Signature"
# Bounds on a signature field before any library parses it. A 4096-bit RSA b= is 684
# characters and a long h= a few hundred: 8 KiB leaves room for z= and i=.
MAX_FIELD = 8192
MAX_WSP_RUN = 64  # folding white space is a few characters (RFC 6376 §3.2, RFC 5322 FWS)
_WSP_RUN = re.compile(rf"\s{{{MAX_WSP_RUN + 1}}}")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_WSP = re.compile(rb"\s+")
MAX_DIGITS = {b"t": 12, b"x": 12, b"l": 76}  # seconds since 1970 to year 33658; RFC 6376 l=

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


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _key_problem(tags: dict[bytes, bytes], key: dict[bytes, bytes]) -> str:
    """Why the key record cannot verify this signature (RFC 6376 §3.6.1), or ''."""
    if not re.sub(rb"\s+", b"", key.get(b"p", b"")):
        return "key revoked (empty p=)"
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return "key record v= is not DKIM1"
    key_type, hash_name = ALGORITHMS[tags[b"a"]]
    if key.get(b"k", b"rsa").strip().lower() != key_type:
        return f"key type {_text(key.get(b'k', b'rsa'))} does not match a={_text(tags[b'a'])}"
    if b"h" in key and hash_name not in [h.strip().lower() for h in key[b"h"].split(b":")]:
        return f"key h={_text(key[b'h'])} does not allow {_text(hash_name)}"
    flags = [f.strip() for f in key.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in tags:
        i_domain = tags[b"i"].rpartition(b"@")[2].lower().rstrip(b".")
        if i_domain != tags[b"d"].lower().rstrip(b"."):
            return "key t=s forbids an i= below d="
    return ""


Problem = tuple[Result, str]


def _signature_problem(tags: dict[bytes, bytes], now: float) -> Problem | None:
    """What makes the signature field unusable before any key or crypto, or None."""
    for tag, digits in MAX_DIGITS.items():
        if tag in tags and not (tags[tag].isdigit() and len(tags[tag]) <= digits):
            return Result.NEUTRAL, f"malformed signature: {_text(tag)}= is not a number of " \
                                   f"at most {digits} digits"
    for tag in (b"b", b"bh"):
        if tag in tags and not _BASE64.fullmatch(_WSP.sub(b"", tags[tag])):
            return Result.NEUTRAL, f"malformed signature: {_text(tag)}= is not base64"
    if tags.get(b"a") == b"rsa-sha1":
        return Result.FAIL, "rsa-sha1 is not acceptable (RFC 8301)"
    try:
        dkimpy.validate_signature_fields(tags)
    except dkimpy.ValidationError as exc:
        # dkimpy allows 10 hours past x=; expiry is judged below, exactly
        if b"x" not in tags or not str(exc).startswith("x= value is past"):
            return Result.NEUTRAL, f"malformed signature: {exc}"
    if tags[b"a"] not in ALGORITHMS:
        return Result.NEUTRAL, f"unknown algorithm {_text(tags[b'a'])}"
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
    try:
        problem = _key_problem(tags, parse_tag_value(record))
        if problem:
            return record, (Result.PERMERROR, problem)
        _, bits, _, _ = _evaluate_pk(name.encode() + b".", record)
    except (InvalidTagValueList, dkimpy.DKIMException, ValueError) as exc:
        # dkimpy lets binascii.Error (a ValueError) out of evaluate_pk for bad base64
        return record, (Result.PERMERROR, f"malformed key record: {exc}")
    if tags[b"a"].startswith(b"rsa") and bits < MIN_RSA_BITS:
        return record, (Result.FAIL, f"RSA key of {bits} bits (RFC 8301)")
    if tags[b"a"].startswith(b"rsa") and bits < settings.min_key_bits:
        return record, (Result.POLICY, f"RSA key of {bits} bits < min_key_bits")
    return record, None


@functools.lru_cache(maxsize=1024)
def _evaluate_pk(name: bytes, record: bytes) -> tuple[object, int, bytes, bool]:
    """dkimpy's parse of a key record (pure-Python ASN.1: ~0.1 ms), once per record."""
    return dkimpy.evaluate_pk(name, record)  # type: ignore[no-any-return]


class _HeaderDKIM(dkimpy.DKIM):  # type: ignore[misc]
    """dkimpy for the header signature only: mailward verifies the body hash itself, from the
    spool (dkimpy would canonicalize the whole body in memory, in quadratic time on some
    input). hash_headers signs the DKIM-Signature field as received, bh= included, so the
    header signature still covers the body hash that mailward compared. The key comes from
    the record `_key` already fetched and parsed (cached), as dkimpy's verify_sig would."""

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., bytes]) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = _evaluate_pk(name, dnsfunc(name))
        except (dkimpy.KeyFormatError, binascii.Error):
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: object) -> bool:
        without_bh = {k: v for k, v in sig.items() if k != b"bh"}
        return bool(super().verify_sig_process(without_bh, include_headers, sig_header,
                                               dnsfunc))


BodyKey = tuple[bool, str, int | None]  # relaxed, hash, l=


def _body_key(tags: dict[bytes, bytes]) -> BodyKey:
    body_c = tags.get(b"c", b"simple/simple").partition(b"/")[2] or b"simple"
    limit = int(tags[b"l"]) if b"l" in tags else None
    return body_c.strip().lower() == b"relaxed", ALGORITHMS[tags[b"a"]][1].decode(), limit


def body_hashes(body: Body | None, keys: set[BodyKey]) -> dict[BodyKey, BodyHash]:
    """Every body hash the signatures need, in one pass over the spooled body."""
    hashes = {k: BodyHash(relaxed=k[0], hash_name=k[1], limit=k[2]) for k in keys}
    if body is not None and hashes:
        for chunk in body.chunks():
            for h in hashes.values():
                h.update(chunk)
    return hashes


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
    if len(value) > MAX_FIELD:
        return DkimSignature(Result.NEUTRAL, f"signature field longer than {MAX_FIELD} "
                                             "characters")
    if _WSP_RUN.search(value):
        return DkimSignature(Result.NEUTRAL, f"white space runs over {MAX_WSP_RUN} characters")
    try:
        tags = parse_tag_value(value.encode("utf-8", "surrogateescape"))
    except InvalidTagValueList as exc:
        return DkimSignature(Result.NEUTRAL, f"malformed signature: {exc}")
    sig = DkimSignature(Result.NONE, "", domain=_text(tags.get(b"d", b"")),
                        selector=_text(tags.get(b"s", b"")),
                        algorithm=_text(tags.get(b"a", b"")),
                        b=_text(_WSP.sub(b"", tags.get(b"b", b""))))
    problem = _signature_problem(tags, now)
    if problem is None:
        record, problem = _key(tags, f"{sig.selector}._domainkey.{sig.domain}",
                               resolver=resolver, settings=settings)
    if problem is not None:
        return dataclasses.replace(sig, result=problem[0], reason=problem[1])
    return _Pending(index, sig, tags, record)


def _crypto(message: dkimpy.DKIM, p: _Pending, body: BodyHash, settings: Settings) -> Problem:
    """The body hash (ours), then the header signature (dkimpy); then judge l=."""
    if body.digest() != base64.b64decode(_WSP.sub(b"", p.tags[b"bh"])):
        return Result.FAIL, "body hash mismatch"
    try:
        ok = message.verify(idx=p.index, dnsfunc=lambda *_a, **_k: p.record)
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


def header_bytes(tx: Transaction, names: set[bytes] | None = None) -> bytes:
    """The header as received, and an empty body: what dkimpy is given. With `names`, only
    the fields of those (lower-case) names, in their order: a signature's hash selects fields
    by name, so the others cannot change it, and dkimpy canonicalizes every field it holds."""
    return render_message(((h.name, h.value) for h in tx.headers
                           if names is None
                           or h.name.encode("ascii", "surrogateescape").lower() in names), None)


def message_bytes(tx: Transaction) -> bytes:
    """The message as received (tests and tools; the check streams the body)."""
    return render_message(((h.name, h.value) for h in tx.headers), tx.body)


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
    message = _HeaderDKIM(header_bytes(tx, names), minkey=MIN_RSA_BITS)
    hashes = body_hashes(tx.body, {_body_key(p.tags) for p in pending})
    done: list[DkimSignature] = []
    for item in out:
        if isinstance(item, DkimSignature):
            done.append(item)
            continue
        try:
            problem = _crypto(message, item, hashes[_body_key(item.tags)], settings)
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
