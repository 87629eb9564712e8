"""What the DKIM and ARC checks share about dkimpy: bounds, key records, header-only
verification and streamed body hashes. No check logic: each check maps these answers to
its own results (DKIM's permerror is ARC's fail).

Hostile input (issue 7): a signature field is bounded before dkimpy's regular expressions
see it (`shape_problem`: size and white space runs; `tag_problem`: digit counts and base64),
which keeps them linear. dkimpy canonicalizes a body in memory and in quadratic time on some
input, so it never sees one: `body_hashes` hashes the spooled body a chunk at a time
(core/bodyhash.py) and `HeaderDKIM` verifies the header signature only, against a key record
the caller fetched through mailward's resolver (never dkimpy's own DNS).

It lives in the core, as a model module, because it reads the transaction and the body
(services import no core module); it does no I/O of its own.
"""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Callable, Iterable

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from mailward.core.bodyhash import BodyHash
from mailward.core.transaction import Body, Transaction, render_message

MIN_RSA_BITS = 1024  # RFC 8301 §3.2
ALGORITHMS = {b"rsa-sha256": (b"rsa", b"sha256"), b"ed25519-sha256": (b"ed25519", b"sha256")}
# Bounds on a signature field before any library parses it. A 4096-bit RSA b= is 684
# characters and a long h= a few hundred: 8 KiB leaves room for z= and i=.
MAX_FIELD = 8192
MAX_WSP_RUN = 64  # folding white space is a few characters (RFC 6376 §3.2, RFC 5322 FWS)
_WSP_RUN = re.compile(rf"\s{{{MAX_WSP_RUN + 1}}}")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
WSP = re.compile(rb"\s+")
MAX_DIGITS = {b"t": 12, b"x": 12, b"l": 76}  # seconds since 1970 to year 33658; RFC 6376 l=


def text(value: bytes) -> str:
    """Bytes of a tag value, for a reason or a property (never raises)."""
    return value.decode("ascii", "replace")


def shape_problem(value: str) -> str:
    """Why a signature field is too large or too loose to hand to dkimpy, or ''."""
    if len(value) > MAX_FIELD:
        return f"signature field longer than {MAX_FIELD} characters"
    if _WSP_RUN.search(value):
        return f"white space runs over {MAX_WSP_RUN} characters"
    return ""


def tag_problem(tags: dict[bytes, bytes]) -> str:
    """Why a tag of a parsed signature is unusable before dkimpy validates it, or ''."""
    for tag, digits in MAX_DIGITS.items():
        if tag in tags and not (tags[tag].isdigit() and len(tags[tag]) <= digits):
            return f"malformed signature: {text(tag)}= is not a number of at most {digits} " \
                   "digits"
    for tag in (b"b", b"bh"):
        if tag in tags and not _BASE64.fullmatch(WSP.sub(b"", tags[tag])):
            return f"malformed signature: {text(tag)}= is not base64"
    return ""


def key_problem(tags: dict[bytes, bytes], key: dict[bytes, bytes]) -> str:
    """Why the key record cannot verify this signature (RFC 6376 §3.6.1), or ''."""
    if not re.sub(rb"\s+", b"", key.get(b"p", b"")):
        return "key revoked (empty p=)"
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return "key record v= is not DKIM1"
    key_type, hash_name = ALGORITHMS[tags[b"a"]]
    if key.get(b"k", b"rsa").strip().lower() != key_type:
        return f"key type {text(key.get(b'k', b'rsa'))} does not match a={text(tags[b'a'])}"
    if b"h" in key and hash_name not in [h.strip().lower() for h in key[b"h"].split(b":")]:
        return f"key h={text(key[b'h'])} does not allow {text(hash_name)}"
    flags = [f.strip() for f in key.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in tags:
        i_domain = tags[b"i"].rpartition(b"@")[2].lower().rstrip(b".")
        if i_domain != tags[b"d"].lower().rstrip(b"."):
            return "key t=s forbids an i= below d="
    return ""


def judge_key(tags: dict[bytes, bytes], name: str, record: bytes) -> tuple[int, str]:
    """(key bits, why the record cannot verify the signature or ''), parsing it once."""
    try:
        problem = key_problem(tags, parse_tag_value(record))
        if problem:
            return 0, problem
        _, bits, _, _ = evaluate_pk(name.encode() + b".", record)
    except (InvalidTagValueList, dkimpy.DKIMException, ValueError) as exc:
        # dkimpy lets binascii.Error (a ValueError) out of evaluate_pk for bad base64
        return 0, f"malformed key record: {exc}"
    return int(bits), ""


@functools.lru_cache(maxsize=1024)
def evaluate_pk(name: bytes, record: bytes) -> tuple[object, int, bytes, bool]:
    """dkimpy's parse of a key record (pure-Python ASN.1: ~0.1 ms), once per record."""
    return dkimpy.evaluate_pk(name, record)  # type: ignore[no-any-return]


class HeaderDKIM(dkimpy.DKIM):  # type: ignore[misc]
    """dkimpy for the header signature only: mailward verifies the body hash itself, from the
    spool (dkimpy would canonicalize the whole body in memory, in quadratic time on some
    input). hash_headers signs the signature field as received, bh= included, so the header
    signature still covers the body hash that mailward compared. The key comes from the
    record the caller already fetched and parsed (cached), as dkimpy's verify_sig would."""

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., bytes]) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = evaluate_pk(name, dnsfunc(name))
        except (dkimpy.KeyFormatError, binascii.Error):
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: object) -> bool:
        without_bh = {k: v for k, v in sig.items() if k != b"bh"}
        return bool(super().verify_sig_process(without_bh, include_headers, sig_header,
                                               dnsfunc))


BodyKey = tuple[bool, str, int | None]  # relaxed, hash, l=


def body_key(tags: dict[bytes, bytes], default_c: bytes = b"simple/simple") -> BodyKey:
    """What a signature's body hash depends on (its tags must have passed validation)."""
    body_c = tags.get(b"c", default_c).partition(b"/")[2] or b"simple"
    limit = int(tags[b"l"]) if b"l" in tags else None
    return body_c.strip().lower() == b"relaxed", ALGORITHMS[tags[b"a"]][1].decode(), limit


def body_hashes(body: Body | None, keys: Iterable[BodyKey]) -> dict[BodyKey, BodyHash]:
    """Every body hash the signatures need, in one pass over the spooled body."""
    hashes = {k: BodyHash(relaxed=k[0], hash_name=k[1], limit=k[2]) for k in keys}
    if body is not None and hashes:
        for chunk in body.chunks():
            for h in hashes.values():
                h.update(chunk)
    return hashes


def header_fields(headers: Iterable[tuple[str, str]]) -> list[list[bytes]]:
    """Header fields as dkimpy's parser gives them (the name; the value with CRLF folds and
    its line end), built in linear time: dkimpy's rfc822_parse appends each continuation
    line to a bytes value, which is quadratic in a field of many short folds (100 KB of them:
    35 ms; 1 MB: 5 s)."""
    return [[name.encode("ascii", "surrogateescape"),
             value.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8",
                                                                     "surrogateescape")
             + b"\r\n"] for name, value in headers]


def header_dkim(tx: Transaction, names: set[bytes] | None = None) -> HeaderDKIM:
    """A HeaderDKIM holding the fields of the (lower-case) `names`, in their order (see
    `header_bytes`), parsed in linear time (`header_fields`)."""
    message = HeaderDKIM(None, minkey=MIN_RSA_BITS)
    message.headers = header_fields((h.name, h.value) for h in tx.headers
                             if names is None
                             or h.name.encode("ascii", "surrogateescape").lower() in names)
    return message


def header_bytes(tx: Transaction, names: set[bytes] | None = None) -> bytes:
    """The header as received, and an empty body: what dkimpy is given. With `names`, only
    the fields of those (lower-case) names, in their order: a signature's hash selects fields
    by name, so the others cannot change it, and dkimpy canonicalizes every field it holds."""
    return render_message(((h.name, h.value) for h in tx.headers
                           if names is None
                           or h.name.encode("ascii", "surrogateescape").lower() in names), None)


def message_bytes(tx: Transaction) -> bytes:
    """The message as received (tests and tools; the checks stream the body)."""
    return render_message(((h.name, h.value) for h in tx.headers), tx.body)
