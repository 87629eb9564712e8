"""OpenSSL's RSA in dkimpy gives dkimpy's own answers (services/dkimcrypto.py)."""

from __future__ import annotations

import hashlib
import random
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
        sig = dkimcrypto.sign(h, private)  # type: ignore[arg-type]
        if sig[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero octet in 5000 tries")
    assert pure.RSASSA_PKCS1_v1_5_verify(h, sig[1:], public)
    assert dkimcrypto.verify(h, sig[1:], public)  # type: ignore[arg-type]


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
