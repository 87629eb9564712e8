"""OpenSSL's RSA in dkimpy gives dkimpy's own answers (services/dkimcrypto.py)."""

from __future__ import annotations

import hashlib
import math
import random
import subprocess
import sys
from pathlib import Path

import dkim as dkimpy
import pytest
from dkim import crypto as pure

from mailward.services import dkimcrypto, keys


@pytest.fixture(scope="module", params=[1024, 2048, 3072])
def key(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[dict[str, int], dict[str, int]]:
    """(dkimpy's private key dictionary, its public one) for a new key of that size."""
    d: Path = tmp_path_factory.mktemp("rsa")
    k = keys.generate(domain="example.com", selector="s", bits=request.param, directory=str(d))
    private = pure.parse_pem_private_key(k.material)
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    return private, public


def digests(count: int) -> list[object]:
    rng = random.Random(3)
    return [hashlib.new(rng.choice(["sha256", "sha1"]), rng.randbytes(rng.randrange(0, 200)))
            for _ in range(count)]


def test_signatures_are_dkimpys_byte_for_byte(key: tuple[dict[str, int], dict[str, int]]
                                              ) -> None:
    private, _ = key
    for h in digests(20):
        assert dkimpy_sign(h, private) == dkimcrypto.sign(h, private)  # type: ignore[arg-type]


def dkimpy_sign(h: object, private: dict[str, int]) -> bytes:
    return bytes(pure.RSASSA_PKCS1_v1_5_sign(h, private))


def test_verification_agrees_with_dkimpy(key: tuple[dict[str, int], dict[str, int]]) -> None:
    """Valid signatures, bit flips, truncations, a wrong digest: the same answer. A signature
    longer than the modulus (dkimpy reduces it modulo n) is invalid here (RFC 8017 §8.2.2)."""
    private, public = key
    rng = random.Random(5)
    size = (int(public["modulus"]).bit_length() + 7) // 8
    seen = {True: 0, False: 0}
    stripped_valid = 0  # sig[1:] is valid too when sig starts with a zero octet (key-dependent)
    for h in digests(30):
        sig = dkimcrypto.sign(h, private)  # type: ignore[arg-type]
        stripped_valid += sig[0] == 0
        flipped = bytearray(sig)
        flipped[rng.randrange(len(sig))] ^= 1 << rng.randrange(8)
        other = hashlib.new(h.name, b"another message")  # type: ignore[attr-defined]
        for candidate, digest in ((sig, h), (bytes(flipped), h), (sig[1:], h), (sig[:-1], h),
                                  (b"", h), (sig, other), (b"\0" * size, h)):
            ours = dkimcrypto.verify(digest, candidate, public)  # type: ignore[arg-type]
            assert ours == pure.RSASSA_PKCS1_v1_5_verify(digest, candidate, public)
            seen[ours] += 1
        plus_n = (int.from_bytes(sig, "big") + int(public["modulus"])).to_bytes(size + 1, "big")
        assert pure.RSASSA_PKCS1_v1_5_verify(h, plus_n, public)  # dkimpy: malleable
        assert not dkimcrypto.verify(h, plus_n, public)  # type: ignore[arg-type]
    assert seen[True] == 30 + stripped_valid and seen[False] == 30 * 6 - stripped_valid


def test_a_signature_without_its_leading_zero_octet_verifies_as_in_dkimpy(
        key: tuple[dict[str, int], dict[str, int]]) -> None:
    private, public = key
    rng = random.Random(11)
    for _ in range(5000):
        h = hashlib.sha256(rng.randbytes(16))
        sig = dkimcrypto.sign(h, private)
        if sig[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero octet in 5000 tries")
    assert pure.RSASSA_PKCS1_v1_5_verify(h, sig[1:], public)
    assert dkimcrypto.verify(h, sig[1:], public)


def test_install_puts_them_into_dkimpy(tmp_path: Path) -> None:
    dkimcrypto.install()
    assert dkimpy.RSASSA_PKCS1_v1_5_sign is dkimcrypto.sign
    assert dkimpy.RSASSA_PKCS1_v1_5_verify is dkimcrypto.verify
    k = keys.generate(domain="example.com", selector="s", directory=str(tmp_path))
    message = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = dkimpy.sign(message, b"s", b"example.com", k.material) + message
    record = keys.dns_record(k).encode()
    assert dkimpy.verify(signed, dnsfunc=lambda *_a, **_k: record)
    assert not dkimpy.verify(signed.replace(b"Subject: hi", b"Subject: ho"),
                             dnsfunc=lambda *_a, **_k: record)


def raw_sign(private: dict[str, int], block: bytes) -> bytes:
    """RSA applied to any block (no encoding check): how a forger would shape one."""
    n = int(private["modulus"])
    size = (n.bit_length() + 7) // 8
    return pow(int.from_bytes(block, "big"), int(private["privateExponent"]), n).to_bytes(
        size, "big")


def test_verification_agrees_with_openssl_on_crafted_encodings(
        key: tuple[dict[str, int], dict[str, int]]) -> None:
    """Our exponentiation against OpenSSL on blocks a forger could sign: only the one
    EMSA-PKCS1-v1_5 encoding of the digest verifies, on both."""
    private, public = key
    n, e = int(public["modulus"]), int(public["publicExponent"])
    size = (n.bit_length() + 7) // 8
    h = hashlib.sha256(b"the signed header fields")
    info = dkimcrypto.DIGEST_INFO["sha256"] + h.digest()

    def em(info: bytes, head: bytes = b"\0\1", pad: int = 0xFF, tail: bytes = b"") -> bytes:
        fill = size - len(head) - 1 - len(info) - len(tail)
        return head + bytes([pad]) * fill + b"\0" + info + tail

    no_null = bytes.fromhex("302f300b0609608648016503040201" "0420") + h.digest()
    blocks = {
        "the encoding": em(info),
        "DigestInfo without NULL parameters": em(no_null),
        "sha1's OID before a sha256 digest": em(dkimcrypto.DIGEST_INFO["sha1"] + h.digest()),
        "block type 2": em(info, head=b"\0\2"),
        "padding not 0xff": em(info, pad=0xFE),
        "garbage after the digest": em(info[:-4], tail=b"\1\2\3\4")[:size],
        "the digest shifted into the padding": (em(info) + b"\0")[1:],
        "a digest of another message": em(dkimcrypto.DIGEST_INFO["sha256"]
                                          + hashlib.sha256(b"other").digest()),
    }
    for why, block in blocks.items():
        assert len(block) == size, why
        sig = raw_sign(private, block)
        ours = dkimcrypto.verify(h, sig, public)
        assert ours == dkimcrypto._openssl_verify(h, sig, n, e), why
        assert ours == (why == "the encoding"), why
    sig = raw_sign(private, blocks["the encoding"])
    for candidate in (sig, sig[1:] if sig[0] == 0 else sig, n.to_bytes(size, "big"),
                      (n - 1).to_bytes(size, "big"), b"\xff" * size, b"\0" * size, b"",
                      b"\1", sig + b"\0"):
        assert dkimcrypto.verify(h, candidate, public) == dkimcrypto._openssl_verify(
            h, candidate, n, e)


def test_invalid_key_numbers_are_a_value_error_as_in_cryptography() -> None:
    h = hashlib.sha256(b"x")
    n = (1 << 2047) + 1231  # odd: its factors do not matter here
    for modulus, exponent in ((1, 65537), (n, 65536), (n, 1), (n, 2), (n, n), (n, n + 2)):
        key = {"modulus": modulus, "publicExponent": exponent}
        with pytest.raises(ValueError):
            dkimcrypto.verify(h, b"\1" * 256, key)
        if exponent.bit_length() <= dkimcrypto.POW_EXPONENT_BITS:
            with pytest.raises(ValueError):
                dkimcrypto._openssl_verify(h, b"\1" * 256, modulus, exponent)


def test_an_even_modulus_verifies_nothing_as_in_openssl(
        key: tuple[dict[str, int], dict[str, int]]) -> None:
    """An even modulus is no RSA key (RFC 8017 §3.1: a product of odd primes), yet s^e mod n
    can still equal the encoding: OpenSSL (Montgomery arithmetic, odd moduli only) verifies
    no signature under it, and neither may we, though the key's publisher can compute one."""
    private, _ = key
    n, e, d = (int(private[k]) for k in ("modulus", "publicExponent", "privateExponent"))
    even = 2 * n
    h = hashlib.sha256(b"signed under an even modulus")
    size = (even.bit_length() + 7) // 8
    m = int.from_bytes(dkimcrypto.encoding(h, size), "big")
    s = pow(m, d, n)
    s += n if (s - m) % 2 else 0  # s = m^d mod n and s = m mod 2: s^e = m mod 2n
    assert pow(s, e, even) == m
    sig = s.to_bytes(size, "big")
    public = {"modulus": even, "publicExponent": e}
    assert not dkimcrypto._openssl_verify(h, sig, even, e)
    assert not dkimcrypto.verify(h, sig, public)


def test_a_key_over_our_bounds_is_verified_by_openssl(
        key: tuple[dict[str, int], dict[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40-bit public exponent (valid, never published) or a modulus over 4096 bits would
    cost Python's pow too much per signature: OpenSSL verifies those, with the same answers."""
    private, _ = key
    n, p, q = (int(private[k]) for k in ("modulus", "prime1", "prime2"))
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    e = next(x for x in range((1 << 40) + 1, 1 << 41, 2) if math.gcd(x, lam) == 1)
    big = {**private, "publicExponent": e, "privateExponent": pow(e, -1, lam)}
    h = hashlib.sha256(b"signed with a large exponent")
    sig = raw_sign(big, dkimcrypto.encoding(h, (n.bit_length() + 7) // 8))
    public = {"modulus": n, "publicExponent": e}
    assert dkimcrypto.verify(h, sig, public)
    assert not dkimcrypto.verify(h, sig[:-1] + bytes([sig[-1] ^ 1]), public)
    calls: list[tuple[int, int]] = []

    def openssl(_h: object, _s: bytes, n: int, e: int) -> bool:
        calls.append((n, e))
        return False

    monkeypatch.setattr(dkimcrypto, "_openssl_verify", openssl)
    dkimcrypto.verify(h, sig, public)
    wide = (1 << 4100) + 1
    dkimcrypto.verify(h, sig, {"modulus": wide, "publicExponent": 65537})
    dkimcrypto.verify(h, sig, {"modulus": n, "publicExponent": 65537})
    assert calls == [(n, e), (wide, 65537)]


def test_an_exponent_of_many_one_bits_is_verified_by_openssl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's pow multiplies once per one bit of e: e = 2^17 - 1 (17 bits, like 65537)
    costs 1.6-1.9 ms per 4096-bit verification against 0.7 for 65537, and a hostile sender
    picks it for up to 100 ARC signatures. Only exponents of at most two one bits (3, 17,
    65537) are ours; OpenSSL verifies the others."""
    calls: list[int] = []

    def openssl(_h: object, _s: bytes, _n: int, e: int) -> bool:
        calls.append(e)
        return False

    monkeypatch.setattr(dkimcrypto, "_openssl_verify", openssl)
    h = hashlib.sha256(b"x")
    n = (1 << 4095) + 1231
    for e in (3, 17, 65537, (1 << 17) - 1, 0x10003):
        dkimcrypto.verify(h, b"\1" * 512, {"modulus": n, "publicExponent": e})
    assert calls == [(1 << 17) - 1, 0x10003]


def test_a_verifying_milter_never_loads_cryptography(
        key: tuple[dict[str, int], dict[str, int]]) -> None:
    """Its OpenSSL backend costs 4.7 MiB of resident memory on Debian 12: the checks import
    nothing of it, and verifying a signature does not load it."""
    private, public = key
    h = hashlib.sha256(b"m")
    sig = dkimcrypto.sign(h, private)
    script = ("import hashlib, sys\n"
              "import mailward.app, mailward.checks\n"
              "from mailward.services import dkimcrypto\n"
              f"ok = dkimcrypto.verify(hashlib.sha256(b'm'), {sig!r}, {public!r})\n"
              "print(ok, sorted(m for m in sys.modules if m.startswith('cryptography')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["True", "[]"]


def test_keys_over_the_cost_bounds_are_not_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key over 8192 bits or an exponent over 64 bits is a ValueError (a permerror in the
    checks): OpenSSL would verify it at up to 7.8 ms, and an ARC chain asks for 100."""
    h = hashlib.sha256(b"x")
    rng = random.Random(13)

    def odd(bits: int) -> int:
        return rng.getrandbits(bits) | 1 | 1 << (bits - 1)

    calls: list[int] = []

    def openssl(_h: object, _s: bytes, n: int, _e: int) -> bool:
        calls.append(n.bit_length())
        return False

    monkeypatch.setattr(dkimcrypto, "_openssl_verify", openssl)
    for n, e in ((odd(8193), 65537), (odd(16384), 3), (odd(2048), (1 << 64) + 1),
                 (odd(3072), odd(3070))):
        with pytest.raises(ValueError, match="over"):
            dkimcrypto.verify(h, b"\1" * 16, {"modulus": n, "publicExponent": e})
    assert calls == []
    for n, e in ((odd(8192), 65537), (odd(2048), (1 << 64) - 1)):  # at the bounds: verified
        assert not dkimcrypto.verify(h, b"\1" * 16, {"modulus": n, "publicExponent": e})
    assert calls == [8192, 2048]
