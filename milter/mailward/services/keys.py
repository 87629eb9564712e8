"""DKIM signing keys: load and check key files, compare with DNS, generate new ones.

A key file is checked when the config is loaded (start-up and reload): it must exist, be a
regular file of at most 64 KiB (a path such as /dev/zero is refused before anything is read),
be readable, parse, and be neither readable nor writable by others nor writable by its group
(modes o+r, o+w and g+w are refused). Group-readable is accepted (e.g. root:mailward 0640):
the group is how an administrator lets the unprivileged mailward user read a key it must not
change, as OpenDKIM allows too. Errors name the file, never its content; the key material is
held out of every repr, so it cannot reach a log.

Formats, as dkimpy uses them: RSA keys in PEM (PKCS#1 or PKCS#8), ed25519 keys as the base64
of the 32-byte seed (RFC 8463).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field

import nacl.signing
from dkim.crypto import UnparsableKeyError, parse_pem_private_key, parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

from mailward.services.dns import DnsError, Resolver


class KeyFileError(ValueError):
    """A key file is unusable; the message names the file and why."""


@dataclass(frozen=True)
class SigningKey:
    """One selector's private key for one signing domain."""

    domain: str
    selector: str
    path: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    bits: int
    material: bytes = field(repr=False, compare=False)
    public: bytes = field(repr=False, compare=False)  # RSA modulus or ed25519 public key

    def __str__(self) -> str:
        return f"{self.domain} {self.selector} {self.path}"


MAX_KEY_SIZE = 64 * 1024  # an RSA 4096 key in PEM is about 3.3 KB
_UNSAFE_MODES = ((stat.S_IROTH, "readable by others"), (stat.S_IWOTH, "writable by others"),
                 (stat.S_IWGRP, "writable by its group"))
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _file_type(mode: int) -> str:
    kinds = {"d": "a directory", "c": "a character device", "b": "a block device",
             "p": "a FIFO", "s": "a socket"}
    return kinds.get(stat.filemode(mode)[0], "not a file")


def _read_key_file(path: str) -> bytes:
    """The bytes of a regular, private enough key file (see the module docstring)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file ({_file_type(info.st_mode)})")
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open won't hang
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"{path}: not a regular file ({_file_type(info.st_mode)})")
            unsafe = [what for bit, what in _UNSAFE_MODES if info.st_mode & bit]
            if unsafe:
                raise KeyFileError(f"{path}: key file is {' and '.join(unsafe)} (mode "
                                   f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it (or 640 "
                                   "for a group that only reads it)")
            data = fh.read(MAX_KEY_SIZE + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None
    if len(data) > MAX_KEY_SIZE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_SIZE // 1024} KiB, not a DKIM key")
    return data


def load_key(path: str, *, domain: str, selector: str) -> SigningKey:
    """Read and check a key file (see the module docstring)."""
    data = _read_key_file(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = parse_pem_private_key(data)
        except (UnparsableKeyError, ValueError, IndexError):
            raise KeyFileError(f"{path}: not a usable RSA private key (PEM)") from None
        modulus = int(key["modulus"])
        return SigningKey(domain, selector, path, b"rsa-sha256", modulus.bit_length(), data,
                          modulus.to_bytes((modulus.bit_length() + 7) // 8, "big"))
    try:
        seed = base64.b64decode(data.strip(), validate=True)
        if len(seed) != 32:
            raise ValueError(len(seed))
        verify_key = bytes(nacl.signing.SigningKey(seed).verify_key)
    except (ValueError, binascii.Error):
        raise KeyFileError(f"{path}: neither an RSA PEM key nor a base64 ed25519 seed") from None
    return SigningKey(domain, selector, path, b"ed25519-sha256", 256, data.strip(), verify_key)


def published_key(record: bytes) -> bytes | None:
    """The public key a DKIM key record publishes, in SigningKey.public's form."""
    try:
        tags = parse_tag_value(record)
        p = base64.b64decode(b"".join(tags.get(b"p", b"").split()))
        if tags.get(b"k", b"rsa").strip() == b"ed25519":
            return p
        modulus = int(parse_public_key(p)["modulus"])
        return modulus.to_bytes((modulus.bit_length() + 7) // 8, "big")
    except (InvalidTagValueList, UnparsableKeyError, ValueError, IndexError, KeyError):
        return None


def record_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


def key_status(key: SigningKey, resolver: Resolver) -> str:
    """Whether DNS publishes `key`: `published`, `missing` (no record), `different` (records,
    none of them this key); a lookup failure raises DnsError."""
    records = resolver.txt(record_name(key.domain, key.selector))
    if any(published_key(r) == key.public for r in records):
        return "published"
    return "different" if records else "missing"


def retired_status(domain: str, selector: str, resolver: Resolver) -> str:
    """What DNS says of a selector being retired: `gone` (no record), `revoked` (a key record
    with an empty p=, RFC 6376 §3.6.1), or `published` (a key still verifies what it signed)."""
    records = resolver.txt(record_name(domain, selector))
    for record in records:
        try:
            if parse_tag_value(record).get(b"p", b"x").strip():
                return "published"
        except InvalidTagValueList:
            return "published"  # unreadable is not proof of retirement
    return "revoked" if records else "gone"


def published_key_warnings(keys: tuple[SigningKey, ...], resolver: Resolver, *, check: str,
                           what: str = "signatures") -> list[str]:
    """Keys that DNS does not publish as configured (what they sign would not verify)."""
    warnings = []
    for key in keys:
        name = record_name(key.domain, key.selector)
        try:
            status = key_status(key, resolver)
        except DnsError as exc:
            warnings.append(f"{check}: cannot check {name} in DNS: {exc}")
            continue
        if status != "published":
            warnings.append(f"{check}: the key {key.path} does not match the record "
                            f"at {name} ({'none' if status == 'missing' else 'different'}); "
                            f"{what} will not verify")
    return warnings


def dns_record(key: SigningKey) -> str:
    """The TXT record data to publish at selector._domainkey.domain."""
    if key.algorithm == b"ed25519-sha256":
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(key.public).decode()}"
    der = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=key.material,
                         capture_output=True, check=True).stdout
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def zone_line(key: SigningKey) -> str:
    """A zone-file line for the record, in strings of at most 255 bytes (RFC 1035 §3.3)."""
    data = dns_record(key)
    chunks = " ".join(f'"{data[i:i + 250]}"' for i in range(0, len(data), 250))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT ( {chunks} )"


def dns_name_problem(name: str) -> str:
    """Why `name` is not a DNS name of letter-digit-hyphen labels ('' when it is one).

    Domains and selectors (RFC 6376 §3.1) become file names, so this also keeps `/`, `..`
    and leading dots out of the paths built from them.
    """
    if not name or len(name) > 253:
        return "it must have 1 to 253 characters"
    for label in name.split("."):
        if not label:
            return "it has an empty label (a leading, trailing or doubled dot)"
        if not _LABEL_RE.fullmatch(label):
            return (f"label {label!r} is not 1 to 63 letters, digits and hyphens (no hyphen "
                    "first or last)")
    return ""


def generate(*, domain: str, selector: str, kind: str = "rsa", bits: int = 2048,
             directory: str = ".") -> SigningKey:
    """Write a new private key, mode 0600, to DIRECTORY/DOMAIN.SELECTOR.key (never over one).

    `domain` and `selector` must be DNS names (`dns_name_problem`); a ValueError says which
    is not, before anything is written.
    """
    for what, name in (("domain", domain), ("selector", selector)):
        problem = dns_name_problem(name)
        if problem:
            raise ValueError(f"{what} {name!r} is not a DNS name: {problem}")
    path = os.path.join(directory, f"{domain}.{selector}.key")
    if kind == "ed25519":
        material = base64.b64encode(bytes(nacl.signing.SigningKey.generate())) + b"\n"
    else:
        material = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                                   f"rsa_keygen_bits:{bits}"], capture_output=True,
                                  check=True).stdout
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(material)
    return load_key(path, domain=domain, selector=selector)
