"""arc_seal: mail we relay onward after changing it carries our ARC set (RFC 8617 §5.1).

Which mail: outbound mail (it leaves for another domain) from a client in `networks` or on a
service whose `{daemon_name}` is in `daemons`: a list server or forwarder that re-submits
through Postfix's smtpd. Such a source must be ours ([milter] trusted_networks or
originating_daemons), or its mail would be judged again as inbound and never sealed
(check-config warns). Postfix applies no milter to mail its local delivery agent forwards
(aliases, .forward: MILTER_README, "Limitations"), so such forwarding is never sealed: it
must pass an smtpd hop (a list manager, or a forwarder that re-submits over SMTP).

What it seals (i = the highest instance present + 1, at most 50):
- ARC-Authentication-Results: our authserv-id and every result of our Authentication-Results
  fields, comments kept: the one `authres` adds now (so this check runs after authres, an
  ordering rule of its declaration) and those the message brought back from our own inbound
  pass (authres deletes them as claims of our authserv-id: a sealing source is trusted to
  carry only ours). Each is read by our bounded parser (core/authresults.py).
- cv=: `none` when the message has no ARC set; otherwise the one `arc=` result among those
  (pass, or fail for anything else, several included): the chain as it was when the message
  entered our domain. A chain without such a result was never validated by us and is not
  sealed; neither is one that already has 50 sets.
- ARC-Message-Signature: rsa-sha256, relaxed/relaxed, over the header as it leaves (after
  every earlier check's edits) and the body, hashed from the spool a chunk at a time
  (dkimpy's ARC.sign would canonicalize the whole body in memory): dkimpy's gen_header signs
  the fields we give it, body hash included.
- ARC-Seal: over the sets 1..i in instance order (RFC 8617 §5.1.1), or over ours alone when
  cv=fail (§5.1.2).
Keys as for dkim_sign (services/keys.py: a private file, never logged, the published record
checked at start and reload); RSA only, the one algorithm RFC 8617 defines.

Results: pass = sealed (the reason gives i and cv); none = not sealed, with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from mailward.core import authresults
from mailward.core.arcsets import (
    AAR,
    AMS,
    AS,
    KINDS,
    MAX_INSTANCES,
    ArcSet,
    Broken,
    instance_of,
    read_sets,
)
from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context, ModuleCheck
from mailward.core.dkimglue import header_fields
from mailward.core.ini import IPNetwork, Section
from mailward.core.nets import in_networks
from mailward.core.settings import MilterSettings
from mailward.core.transaction import Direction, Stage, Transaction, index_headers
from mailward.core.verdict import AddHeader, CheckResult, Result, apply_edits
from mailward.services import dkimcrypto
from mailward.services import keys as keymod
from mailward.services.dns import Resolver

dkimcrypto.install()  # dkimpy's RSA through OpenSSL (services/dkimcrypto.py)

NAME = "arc_seal"
AUTHRES = "Authentication-Results"
ALGORITHM = b"rsa-sha256"  # RFC 8617 §4.1.2 and §4.1.3: the only one defined
RELAXED = b"relaxed/relaxed"
# RFC 6376 §5.4.1's list, with DKIM-Signature: an AMS should cover them (RFC 8617 §4.1.2)
SIGNED = ("From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To",
          "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
          "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Post",
          "DKIM-Signature")
MAX_RESINFO = 900  # a copied result longer than this cannot be ours; RFC 5322 lines: 998


@dataclass(frozen=True)
class Settings:
    """[check.arc_seal]"""

    key: str = ""  # "domain selector /path/to/key"
    networks: tuple[IPNetwork, ...] = ()
    daemons: tuple[str, ...] = ()
    headers: tuple[str, ...] = SIGNED
    loaded: keymod.SigningKey | None = field(default=None, repr=False, compare=False)
    # fixed outputs for the public test suite only (never read from the INI file): its
    # t= and its standardized form (sorted tags, lower case, one line)
    timestamp: int | None = field(default=None, repr=False)
    standardize: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        spec = " ".join(sec.string("key", "").split())
        key = None
        if spec:
            parts = spec.split()
            if len(parts) != 3:
                raise sec.error("key", "'domain selector /path/to/key'", spec)
            domain, selector, path = parts
            for what, name in (("domain", domain), ("selector", selector)):
                problem = keymod.dns_name_problem(name.rstrip("."))
                if problem:
                    raise sec.error("key", f"a {what} that is a DNS name ({problem})", spec)
            try:
                key = keymod.load_key(path, domain=domain.lower().rstrip("."),
                                      selector=selector)
            except keymod.KeyFileError as exc:
                raise sec.error("key", f"a readable, private key file ({exc})", spec) from None
            if key.algorithm != ALGORITHM:
                raise sec.error("key", "an RSA key (RFC 8617 defines rsa-sha256 only)", spec)
        headers = sec.words("headers", SIGNED)
        names = {h.lower() for h in headers}
        if "from" not in names or "arc-seal" in names:
            raise sec.error("headers", "a list that includes From and not ARC-Seal "
                                       "(RFC 6376 §5.4, RFC 8617 §4.1.2)", ", ".join(headers))
        return cls(key=spec, networks=sec.networks("networks", ()),
                   daemons=sec.words("daemons", ()), headers=headers, loaded=key)


def _ours(value: str, authserv_id: str) -> authresults.AuthResults | None:
    parsed = authresults.parse(value)
    if parsed is None or parsed.authserv_id.lower().rstrip(".") != authserv_id:
        return None
    return parsed


def our_results(fields: list[str], authserv_id: str) -> list[authresults.ResInfo]:
    """The results of the fields that carry our authserv-id, in order; a result we could
    not have written (over MAX_RESINFO, not printable ASCII) is left out."""
    out = []
    for value in fields:
        parsed = _ours(value, authserv_id.lower().rstrip("."))
        for info in parsed.results if parsed else ():
            if len(info.text) <= MAX_RESINFO and info.text.isascii() and info.text.isprintable():
                out.append(info)
    return out


def chain_status(results: list[authresults.ResInfo], chain: bool) -> str | None:
    """cv= for our seal (RFC 8617 §5.1), or None: we cannot say (no arc= of ours)."""
    if not chain:
        return "none"
    arcs = [r.result for r in results if r.method == "arc"]
    if not arcs:
        return None
    return "pass" if arcs == ["pass"] else "fail"


def _include(headers: list[tuple[str, str]], names: tuple[str, ...]) -> list[bytes]:
    """Each configured field once per instance present, From at least once."""
    present: dict[str, int] = {}
    for name, _ in headers:
        present[name.lower()] = present.get(name.lower(), 0) + 1
    out: list[bytes] = []
    for name in dict.fromkeys(n.lower() for n in names):
        out += [name.encode()] * max(present.get(name, 0), 1 if name == "from" else 0)
    return out


def seal(*, headers: list[tuple[str, str]], sets: list[ArcSet], instance: int, cv: str,
         payload: str, key: keymod.SigningKey, body_hash: bytes, include: list[bytes],
         timestamp: int, standardize: bool = False) -> tuple[str, str, str]:
    """(AAR, AMS, AS) values of set `instance`, signed by dkimpy's gen_header over exactly
    the fields RFC 8617 names (§5.1.1): `sets` are the earlier ones (none for cv=fail)."""
    i = str(instance).encode()
    signer = dkimpy.ARC(None)
    signer.hasher = hashlib.sha256
    pk = parse_pem_private_key(key.material)
    canon = CanonicalizationPolicy.from_c_value(RELAXED)
    aar = b"i=" + i + b"; " + payload.encode("ascii") + b"\r\n"
    # the AMS: over the header as it leaves, the new AAR on top (dkimpy's order); only the
    # fields it names (dkimpy canonicalizes every field it holds)
    named = set(include)
    signer.headers = [*canon.canonicalize_headers([[AAR.encode(), b" " + aar]]),
                      *header_fields((n, v) for n, v in headers
                                     if n.lower().encode("ascii", "surrogateescape") in named)]
    ams = signer.gen_header(
        [(b"i", i), (b"a", ALGORITHM), (b"c", RELAXED), (b"d", key.domain.encode()),
         (b"s", key.selector.encode()), (b"t", str(timestamp).encode()),
         (b"h", b" : ".join(include)), (b"bh", base64.b64encode(body_hash)), (b"b", b"0" * 60)],
        include, canon, AMS.encode(), pk, standardize)
    # the AS: the sets in instance order, then ours. Newest on top, so that dkimpy, which
    # picks fields bottom-up by name, takes them in that order wherever they stood
    earlier = [s.fields[k] for s in reversed(sets) for k in (AS, AMS, AAR)]
    signer.headers = [[AMS.encode(), b" " + ams], [AAR.encode(), b" " + aar],
                      *header_fields([(h.name, h.value) for h in earlier])]
    names = [b"arc-authentication-results", b"arc-message-signature", b"arc-seal"]
    as_value = signer.gen_header(
        [(b"i", i), (b"cv", cv.encode()), (b"a", ALGORITHM), (b"d", key.domain.encode()),
         (b"s", key.selector.encode()), (b"t", str(timestamp).encode()), (b"b", b"0" * 60)],
        names * len(sets) + names[:2], canon, AS.encode(), pk, standardize)

    def value(raw: bytes) -> str:
        return raw.decode("ascii").strip().replace("\r\n", "\n")

    return value(aar), value(ams), value(as_value)


def _source(tx: Transaction, settings: Settings) -> bool:
    return (bool(tx.daemon_name) and tx.daemon_name in settings.daemons) or in_networks(
        tx.client_ip, settings.networks)


def _body_hash(tx: Transaction) -> bytes:
    h = BodyHash(relaxed=True, hash_name="sha256")
    if tx.body is not None:
        for chunk in tx.body.chunks():
            h.update(chunk)
    return h.digest()


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Seal `tx` as it leaves (see the module docstring)."""
    key = settings.loaded
    if key is None:
        return CheckResult(NAME, Result.NONE, reason="no key: nothing is sealed")
    if not _source(tx, settings):
        return CheckResult(NAME, Result.NONE, reason="not from a sealing source")
    edits = tuple(e for r in ctx.results for e in r.edits)
    leaving = apply_edits(tx.headers, edits)
    added = [e.value for e in edits
             if isinstance(e, AddHeader) and e.name.lower() == AUTHRES.lower()]
    brought = [h.value for h in tx.get_all(AUTHRES) if h.value.strip() not in added]
    results = our_results([*added, *brought], ctx.site.authserv_id)
    arc = [v for n, v in leaving if n.lower() in KINDS]
    try:
        sets = read_sets(index_headers(leaving))
        highest = len(sets)
    except Broken:  # whatever we found on the way in, this chain is broken now
        sets, highest = [], max((i or 0 for i in map(instance_of, arc)), default=0)
    cv = chain_status(results, bool(arc))
    if cv is None:
        return CheckResult(NAME, Result.NONE, reason="the message has ARC fields and no arc= "
                                                     "result of ours: never validated here")
    if arc and not sets:
        cv = "fail"
    if highest >= MAX_INSTANCES:
        return CheckResult(NAME, Result.NONE, reason=f"the chain has {MAX_INSTANCES} sets "
                                                     "(RFC 8617 §4.2.1)")
    payload = ";\r\n\t".join([ctx.site.authserv_id, *(r.text for r in results)] if results
                              else [ctx.site.authserv_id, "none"])
    aar, ams, as_value = seal(
        headers=leaving, sets=sets if cv != "fail" else [], instance=highest + 1, cv=cv,
        payload=payload, key=key, body_hash=_body_hash(tx),
        include=_include(leaving, settings.headers),
        timestamp=settings.timestamp or int(time.time()), standardize=settings.standardize)
    return CheckResult(NAME, Result.PASS,
                       reason=f"sealed i={highest + 1} cv={cv} d={key.domain} s={key.selector}",
                       edits=(AddHeader(AAR, aar, top=True), AddHeader(AMS, ams, top=True),
                              AddHeader(AS, as_value, top=True)))


class ArcSeal(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.OUTBOUND})
    # over the header as it leaves (bcc, trace, dkim_sign change it) and our own
    # Authentication-Results, which authres writes
    after = ("bcc", "trace", "dkim_sign", "authres")

    def config_warnings(self, settings: Settings, site: MilterSettings) -> list[str]:
        if settings.loaded is None:
            return []
        out = [f"[check.arc_seal] networks {n} is not within [milter] trusted_networks: its "
               "mail is judged as inbound and never sealed"
               for n in settings.networks
               if not any(n.version == t.version and n.subnet_of(t)  # type: ignore[arg-type]
                          for t in site.trusted_networks)]
        out += [f"[check.arc_seal] daemons {d} is not in [milter] originating_daemons: its "
                "mail is judged as inbound and never sealed"
                for d in settings.daemons if d not in site.originating_daemons]
        if not settings.networks and not settings.daemons:
            out.append("[check.arc_seal] has a key but no networks or daemons: nothing is "
                       "sealed")
        return out

    def setup_warnings(self, settings: Settings, resolver: Resolver) -> list[str]:
        keys = (settings.loaded,) if settings.loaded is not None else ()
        return keymod.published_key_warnings(keys, resolver, check=NAME, what="seals")


CHECK = ArcSeal(Settings.load, check)
