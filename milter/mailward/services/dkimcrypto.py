"""RSA for dkimpy: verification by one modular exponentiation, signing from OpenSSL.

dkimpy signs and verifies RSA with Python's `pow` and byte loops: 6.1 ms per RSA-2048
signature and 0.22 ms per verification on our 2-core machine. `install()` replaces the two
functions dkimpy calls, `RSASSA_PKCS1_v1_5_sign(hash, key)` and
`RSASSA_PKCS1_v1_5_verify(hash, signature, key)`, in dkimpy's module namespace, with the same
arguments (dkimpy's hash object, its key dictionaries) and the same results:
- verification (`verify`) is RFC 8017 §8.2.2 as written: the signature as an integer below n,
  raised to e modulo n, compared octet for octet with the one EMSA-PKCS1-v1_5 encoding of the
  digest. Nothing is parsed out of the decrypted block, so there is no lenient parse to forge
  against. It gives dkimpy's answer for every signature of the modulus length or shorter
  (dkimpy reads the bytes as an integer, so a signature whose leading zero octets were
  dropped verifies); a signature longer than the modulus or not below it, which dkimpy would
  reduce modulo n and could accept, is invalid as step 1 says. Python's `pow` costs 0.14 ms
  per RSA-2048 verification against OpenSSL's 0.025 (through `cryptography`): we give up
  0.1 ms per signature for the 4.7 MiB of resident memory that `cryptography` costs on
  Debian 12 (its OpenSSL backend and x509 modules, which it loads at the first use of a key)
  and 7 MiB from its wheel. That holds for keys of up to 4096 bits with e up to 17 bits and
  at most two one bits (3, 17, 65537: every key seen in practice), at most 0.7 ms each. A
  larger key or other exponent, which nobody publishes but a hostile sender could (up to 100
  ARC verifications per message), goes to OpenSSL as before.
  Invalid key numbers are a ValueError (which the checks make a permerror) on both paths, as
  `cryptography` raises it, and so is a key over 8192 bits or an exponent over 64 bits,
  which OpenSSL would verify at up to 7.8 ms each (`MAX_MODULUS_BITS`). An even modulus,
  which `cryptography` accepts but OpenSSL verifies nothing under, verifies nothing here
  either (its publisher could make s^e mod n equal the encoding);
- signing (`sign`) is deterministic (RFC 8017 §8.2), so our signature is byte for byte
  dkimpy's (the tests compare them). It is OpenSSL's, through `cryptography`, imported at the
  first signature: a milter that only verifies never loads it.
OpenSSL key objects are built from dkimpy's key numbers once per key (bounded caches).
Debian 12 packages `cryptography` (python3-cryptography 38) and dkimpy 1.1.4 has the same
two names.

`install()` also replaces `RE_BTAG`, the regular expression with which dkimpy empties b= in
the signature field it hashes (DKIM-Signature, ARC-Message-Signature, ARC-Seal), with
`B_TAG`, which matches the same text faster (0.006 against 0.04 ms per field). dkimpy's
folding white space matches exactly the runs of white space, empty ones included, so its
b= value, white space runs each followed by one base64 character, is the longest run of
white space and base64 characters up to its last base64 character, which `B_TAG` says
directly instead of through nested optional groups. tests/test_properties.py compares the
two on arbitrary input. It is also linear where dkimpy's is not: `;b=A` and 40,000 CRLFs
take dkimpy's 80 s (helper-23's measurement; our field bounds keep such input away from it).
Only dkimpy's expression as we know it is replaced (`DKIMPY_B_TAG`): another one, from a
dkimpy we have not compared, stays.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any, Protocol

import dkim as dkimpy

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa, utils

DKIMPY_B_TAG = (rb"([;\s]b(?:(?:\s*\r?\n)?\s+)?=)(?:(?:(?:\s*\r?\n)?\s+)?[a-zA-Z0-9+/=])*"
                rb"(?:\r?\n\Z)?")
B_TAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
# RFC 8017 §9.2 note 1: the DER DigestInfo that precedes each digest dkimpy uses
DIGEST_INFO = {"sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
               "sha1": bytes.fromhex("3021300906052b0e03021a05000414")}
# Keys `verify` raises to e itself: at most 0.7 ms each (4096 bits, e = 65537). A larger
# modulus or other exponent (allowed, never seen: a hostile key) goes to OpenSSL, up to the
# MAX_ bounds below
POW_MODULUS_BITS = 4096  # RFC 8301 §3.2: what verifiers must support
POW_EXPONENT_BITS = 17  # 3, 17, 65537
POW_EXPONENT_ONES = 2  # pow multiplies once per one bit: 2^17 - 1 would cost 1.9 ms, not 0.7
# Keys verified at all. OpenSSL's own bounds (16384 bits; a 64-bit e above 3072 bits) let one
# verification cost 5.5 ms (16384 bits, 64-bit e) or 7.8 ms (3072 bits, 3070-bit e), and an
# ARC chain asks for up to 100: a second of CPU per message from one hostile sender's key.
# RFC 8301 §3.2: verifiers must handle 1024 to 4096 bits, may handle more. At these bounds
# one verification costs at most 1.5 ms (8192 bits, 64-bit e).
MAX_MODULUS_BITS = 8192
MAX_EXPONENT_BITS = 64  # OpenSSL's own bound above 3072 bits; published keys use 17 at most


class _Hash(Protocol):
    """dkimpy's hash objects (hashlib's, or its HashThrough wrapper)."""

    @property
    def name(self) -> str: ...

    def digest(self) -> bytes: ...


def _check_public(n: int, e: int) -> None:
    """ValueError unless (n, e) is an RSA public key, as `cryptography` checks it."""
    if n < 3:
        raise ValueError("RSA modulus must be >= 3")
    if e < 3 or e >= n or e % 2 == 0:
        raise ValueError("RSA public exponent must be odd, >= 3 and < modulus")


def verify(h: _Hash, signature: bytes, key: dict[str, Any]) -> bool:
    """Whether `signature` is RSASSA-PKCS1-v1_5 over `h`'s digest for dkimpy's public key."""
    n, e = int(key["modulus"]), int(key["publicExponent"])
    if n.bit_length() > MAX_MODULUS_BITS:
        raise ValueError(f"RSA key of {n.bit_length()} bits, over {MAX_MODULUS_BITS}")
    if e.bit_length() > MAX_EXPONENT_BITS:
        raise ValueError(f"RSA public exponent of {e.bit_length()} bits, over "
                         f"{MAX_EXPONENT_BITS}")
    if n.bit_length() > POW_MODULUS_BITS or e.bit_length() > POW_EXPONENT_BITS \
            or e.bit_count() > POW_EXPONENT_ONES:
        return _openssl_verify(h, signature, n, e)
    _check_public(n, e)
    size = (n.bit_length() + 7) // 8
    expected = encoding(h, size)
    s = int.from_bytes(signature, "big")
    if len(signature) > size or s >= n or n % 2 == 0:
        return False  # an even n is no RSA key (§3.1): OpenSSL verifies nothing under it
    return pow(s, e, n).to_bytes(size, "big") == expected


def encoding(h: _Hash, size: int) -> bytes:
    """The EMSA-PKCS1-v1_5 encoding of `h`'s digest in `size` octets (RFC 8017 §9.2)."""
    digest_info = DIGEST_INFO[h.name.lower()] + h.digest()
    if size < len(digest_info) + 11:
        raise ValueError("RSA modulus too short for the digest")  # §9.2 step 3
    return b"\0\1" + b"\xff" * (size - len(digest_info) - 3) + b"\0" + digest_info


def _openssl_verify(h: _Hash, signature: bytes, n: int, e: int) -> bool:
    """`verify` by OpenSSL, for keys over the bounds of our own (or to compare with it)."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - see above
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    public = _public(n, e)
    size = (public.key_size + 7) // 8
    if len(signature) > size:
        return False
    try:
        public.verify(bytes(signature).rjust(size, b"\0"), h.digest(), padding.PKCS1v15(),
                      _prehashed(h))
    except InvalidSignature:
        return False
    return True


def _prehashed(h: _Hash) -> utils.Prehashed:
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - see above
    from cryptography.hazmat.primitives.asymmetric import utils  # noqa: PLC0415

    return utils.Prehashed({"sha256": hashes.SHA256, "sha1": hashes.SHA1}[h.name.lower()]())


@functools.lru_cache(maxsize=256)
def _public(n: int, e: int) -> rsa.RSAPublicKey:
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415 - see above

    return rsa.RSAPublicNumbers(e, n).public_key()


@functools.lru_cache(maxsize=64)
def _private(numbers: tuple[int, ...]) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415 - signing only

    n, e, d, p, q, dmp1, dmq1, iqmp = numbers
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp,
                                 rsa.RSAPublicNumbers(e, n)).private_key()


def sign(h: _Hash, key: dict[str, Any]) -> bytes:
    """RSASSA-PKCS1-v1_5 signature of `h`'s digest with dkimpy's private key dictionary."""
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    numbers = tuple(int(key[k]) for k in ("modulus", "publicExponent", "privateExponent",
                                           "prime1", "prime2", "exponent1", "exponent2",
                                           "coefficient"))
    return _private(numbers).sign(h.digest(), padding.PKCS1v15(), _prehashed(h))


def install() -> None:
    """Make dkimpy (DKIM and ARC, signing and verifying) use `sign`, `verify` and `B_TAG`."""
    dkimpy.RSASSA_PKCS1_v1_5_sign = sign
    dkimpy.RSASSA_PKCS1_v1_5_verify = verify
    original = getattr(dkimpy, "RE_BTAG", None)
    if original is not None and original.pattern == DKIMPY_B_TAG:
        dkimpy.RE_BTAG = B_TAG
