"""dkim_sign: outbound mail from our domains gets a DKIM signature (RFC 6376, RFC 8463).

The signing domain is the RFC5322.From domain, or what `domain_map` maps it to (e.g. a
subdomain to its parent). Every key configured for that domain signs (dual signing with an RSA
and an ed25519 key). The header is signed as it will leave: after the deletions and changes of
the checks before this one (Bcc, trace), so the chain must list bcc and trace first. Default
headers as RFC 6376 §5.4.1 suggests, with From, To, Cc, Subject, Date, Reply-To, Message-ID and
the MIME fields over-signed (listed once more than present, so none can be added later).

The body is hashed as it comes off the spool (core/bodyhash.py), once per canonicalization
and hash: dkimpy is given the header only and the body hash, so signing a 50 MB message costs
one spool chunk of memory, not the message several times over.

Results: pass = signed (one DKIM-Signature per key); none = not outbound, no single author
domain, or no key for it. Nothing is ever signed for a domain without a configured key.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import dkim as dkimpy

from mailward.core.addresses import authors
from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context, ModuleCheck
from mailward.core.ini import Section
from mailward.core.settings import MilterSettings
from mailward.core.transaction import Direction, Stage, Transaction, render_message
from mailward.core.verdict import AddHeader, CheckResult, Result, apply_edits
from mailward.services import dkimcrypto
from mailward.services import keys as keymod
from mailward.services.dns import Resolver

dkimcrypto.install()  # dkimpy's RSA through OpenSSL (services/dkimcrypto.py)

NAME = "dkim_sign"
FIELD = "DKIM-Signature"
SIGNED = ("From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To",
          "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
          "Content-Language", "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post")
OVERSIGNED = ("From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "MIME-Version",
              "Content-Type", "Content-Transfer-Encoding")


_HASH = {b"rsa-sha256": "sha256", b"ed25519-sha256": "sha256"}  # the algorithms keys.py loads


@dataclass(frozen=True)
class Settings:
    """[check.dkim_sign]"""

    keys: tuple[str, ...] = ()  # "domain selector /path/to/key", one per line
    domain_map: tuple[str, ...] = ()  # "from.domain:signing.domain"
    headers: tuple[str, ...] = SIGNED
    oversign: tuple[str, ...] = OVERSIGNED
    canonicalization: str = "relaxed/relaxed"
    directions: tuple[Direction, ...] = (Direction.OUTBOUND,)
    loaded: tuple[keymod.SigningKey, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        raw = sec.string("keys", "")
        specs, loaded = [], []
        for line in (ln.strip() for ln in raw.splitlines()):
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise sec.error("keys", "lines of 'domain selector /path/to/key'", line)
            domain, selector, path = parts
            try:
                loaded.append(keymod.load_key(path, domain=domain.lower().rstrip("."),
                                              selector=selector))
            except keymod.KeyFileError as exc:
                raise sec.error("keys", f"a readable, private key file ({exc})", line) from None
            specs.append(" ".join(parts))
        mapping = []
        for pair in sec.words("domain_map", ()):
            src, colon, dst = pair.partition(":")
            if not colon or not src or not dst:
                raise sec.error("domain_map", "from.domain:signing.domain pairs", pair)
            mapping.append(f"{src.lower().rstrip('.')}:{dst.lower().rstrip('.')}")

        def canon(value: str) -> str:
            if not re.fullmatch(r"(simple|relaxed)/(simple|relaxed)", value.lower()):
                raise ValueError(value)
            return value.lower()

        headers = sec.words("headers", SIGNED)
        if "from" not in {h.lower() for h in headers}:
            raise sec.error("headers", "a list that includes From (RFC 6376 §5.4)",
                            ", ".join(headers))
        return cls(
            keys=tuple(specs), domain_map=tuple(mapping), headers=headers,
            oversign=sec.words("oversign", OVERSIGNED),
            canonicalization=sec.parse("canonicalization", cls.canonicalization,
                                       "header/body canonicalization, e.g. relaxed/relaxed",
                                       canon),
            directions=sec.enums("directions", Direction, cls.directions),
            loaded=tuple(loaded),
        )

    @functools.cached_property
    def signing_domain(self) -> dict[str, str]:
        """domain_map as a lookup, built once per loaded config."""
        return dict(m.split(":", 1) for m in self.domain_map)


def _include(headers: list[tuple[str, str]], settings: Settings) -> list[bytes]:
    present: dict[str, int] = {}
    for name, _ in headers:
        present[name.lower()] = present.get(name.lower(), 0) + 1
    over = {h.lower() for h in settings.oversign}
    out = []
    for name in dict.fromkeys(h.lower() for h in settings.headers):
        count = present.get(name, 0) + (1 if name in over else 0)
        out += [name.encode()] * count
    return out


class _StreamedDKIM(dkimpy.DKIM):  # type: ignore[misc]
    """dkimpy signing a header whose body it never sees: `gen_header` receives the tags with
    the body hash dkimpy computed over an empty body and swaps in ours, before the header
    hash and the signature are computed over them."""

    def __init__(self, header: bytes, body_hash: bytes) -> None:
        super().__init__(header)
        self._bh = base64.b64encode(body_hash)

    def gen_header(self, fields: Sequence[tuple[bytes, bytes]], *args: object,
                   **kwargs: object) -> bytes:
        fields = [(k, self._bh if k == b"bh" else v) for k, v in fields]
        return bytes(super().gen_header(fields, *args, **kwargs))


def _body_hashes(tx: Transaction, relaxed: bool, hash_names: set[str]) -> dict[str, bytes]:
    """One pass over the spooled body for every hash the keys need."""
    hashes = {name: BodyHash(relaxed=relaxed, hash_name=name) for name in hash_names}
    if tx.body is not None:
        for chunk in tx.body.chunks():
            for h in hashes.values():
                h.update(chunk)
    return {name: h.digest() for name, h in hashes.items()}


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Sign `tx` as it will leave (see the module docstring)."""
    if tx.direction not in settings.directions:
        return CheckResult(NAME, Result.NONE, reason=f"{tx.direction}: not signed")
    found = authors(tx)
    if found.problem is not None or len(found.domains) != 1:
        why = found.reason or f"{len(found.domains)} author domains"
        return CheckResult(NAME, Result.NONE, reason=f"not signed: {why}")
    domain = settings.signing_domain.get(found.domains[0], found.domains[0])
    signers = [k for k in settings.loaded if k.domain == domain]
    if not signers:
        return CheckResult(NAME, Result.NONE, reason=f"no key for {domain}")
    edits = tuple(e for r in ctx.results for e in r.edits)
    headers = apply_edits(tx.headers, edits)
    header = render_message(headers, None)
    head, body = settings.canonicalization.encode().split(b"/")
    include = _include(headers, settings)
    hashes = _body_hashes(tx, body == b"relaxed", {_HASH[k.algorithm] for k in signers})
    added = []
    for key in signers:
        signer = _StreamedDKIM(header, hashes[_HASH[key.algorithm]])
        signature = signer.sign(key.selector.encode(), key.domain.encode(), key.material,
                                canonicalize=(head, body), include_headers=include,
                                signature_algorithm=key.algorithm)
        value = signature.decode("ascii").split(":", 1)[1].strip().replace("\r\n", "\n")
        added.append(AddHeader(FIELD, value, top=True))
    return CheckResult(NAME, Result.PASS, edits=tuple(added),
                       reason=", ".join(f"d={k.domain} s={k.selector}" for k in signers))


def published_key_warnings(settings: Settings, resolver: Resolver) -> list[str]:
    """Keys that DNS does not publish as configured (their signatures would not verify)."""
    return keymod.published_key_warnings(settings.loaded, resolver, check=NAME)


class DkimSign(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    after = ("bcc", "trace")  # sign the header as it leaves, after their edits

    def config_warnings(self, settings: Settings, site: MilterSettings) -> list[str]:
        if not site.trusted_networks or not settings.loaded:
            return []  # without keys nothing is signed
        nets = ", ".join(str(n) for n in site.trusted_networks)
        return [f"[milter] trusted_networks ({nets}) with dkim_sign keys: every client in "
                "these networks (for loopback: every local user and application) counts as "
                "outbound and gets mail signed without authenticating; prefer SASL or an "
                "originating service (originating_daemons)"]

    def setup_warnings(self, settings: Settings, resolver: Resolver) -> list[str]:
        return published_key_warnings(settings, resolver)


CHECK = DkimSign(Settings.load, check)
