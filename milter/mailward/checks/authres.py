"""authres: write our one Authentication-Results field and delete forgeries of it.

Every incoming `Authentication-Results` field whose authserv-id is ours (compared without case,
and found even in malformed fields: leading comments, quoting, no `;`) is deleted, highest
index first (RFC 8601 §5; deleting in forward order shifted the indices and left forgeries in
place in a peer, CVE-2022-48521). Fields of other authserv-ids are kept. Then one field with our
authserv-id and the entries of every earlier check is added at the top of the header.

Values that come from the message or the SMTP session (addresses, host names) are reduced to
printable ASCII without white space and quoted where needed, so nothing a sender writes can
break out of the field (no header injection).

Results: none = no forged field; pass = forged fields were found and are deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import authres

from mailward.core.addresses import normalise_domain
from mailward.core.check import EVERY_OTHER, Context, ModuleCheck
from mailward.core.ini import Section
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import (
    AddHeader,
    AuthResEntry,
    CheckResult,
    DeleteHeader,
    Result,
    safe_text,
)

NAME = "authres"
FIELD = "Authentication-Results"

_PVALUE_UNSAFE = re.compile(r"[^\x21-\x7e]")
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")  # RFC 5322 §3.2.3 dot-atom text


@dataclass(frozen=True)
class Settings:
    """[check.authres]"""

    directions: tuple[Direction, ...] = (Direction.INBOUND, Direction.INTERNAL,
                                         Direction.OUTBOUND)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        return cls(directions=sec.enums("directions", Direction, cls.directions))


def _skip_cfws(s: str, i: int) -> int:
    """Skip white space and (nested) comments from position i (RFC 5322 §3.2.2 CFWS)."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and not c.isspace():
            break
        i += 1
    return i


def authserv_id_of(value: str) -> str:
    """The authserv-id a field claims, lower-cased; best effort for malformed fields."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == '"':
        out = []
        i += 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\":
                i += 1
            out.append(value[i:i + 1])
            i += 1
        ident = "".join(out)
    else:
        m = re.match(r"[^\s;()]*", value[i:])
        ident = m.group(0) if m else ""
    return ident.strip().rstrip(".").lower()


def _pvalue(value: str) -> str:
    """A property value that stays one value whatever the sender wrote, naming exactly what
    was checked (RFC 8601 §2.2, §2.7), or '' to leave the property out.

    authres leaves any value containing `@` unquoted, so such values are rebuilt here as
    `local-part@domain` with a dot-atom or quoted local-part and the domain as an A-label;
    a local part that is not ASCII is left out (§2.7.2 allows the domain alone). A value that
    is not ASCII otherwise is written as an A-label when it is a domain name, else left out:
    dropping characters would name a different domain.
    """
    if "@" in value:
        local, _, domain = value.rpartition("@")
        ascii_domain = normalise_domain(domain)
        if ascii_domain is None:
            return ""
        local = _PVALUE_UNSAFE.sub("", local)[:128] if local.isascii() else ""
        if not local:
            return ascii_domain
        if not _ATEXT.fullmatch(local):
            local = '"' + re.sub(r'(["\\])', r"\\\1", local) + '"'
        return f"{local}@{ascii_domain}"
    if not value.isascii():
        return normalise_domain(value) or ""
    return _PVALUE_UNSAFE.sub("", value)[:256]


def _reason(text: str) -> str | None:
    """authres would leave a reason containing `@` unquoted: spell the sign out instead."""
    return safe_text(text).replace("@", " at ") or None


def _comment(text: str) -> str | None:
    """A comment after the result: printable ASCII without parentheses or backslashes, so
    it cannot end early or swallow what follows (RFC 5322 §3.2.2 ctext)."""
    return re.sub(r"[()\\]", "", safe_text(text)).strip() or None


def render(authserv_id: str, entries: tuple[AuthResEntry, ...]) -> str:
    """The field value (without leading space), folded one result per line."""
    if not entries:
        return f"{authserv_id}; none"
    parts = []
    for e in entries:
        values = [(ptype, prop, _pvalue(value)) for ptype, prop, value in e.properties]
        props = [authres.AuthenticationResultProperty(ptype, prop, value)
                 for ptype, prop, value in values if value]
        result = authres.AuthenticationResult(
            method=e.method, result=str(e.result), result_comment=_comment(e.comment),
            reason=_reason(e.reason), properties=props)
        parts.append(str(result))
    return f"{authserv_id};\n\t" + ";\n\t".join(parts)


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Delete forged fields and add ours, reporting `ctx.results`."""
    ours = ctx.site.authserv_id.lower()
    forged = [h for h in tx.get_all(FIELD) if authserv_id_of(h.value) == ours]
    edits: list[DeleteHeader | AddHeader] = [
        DeleteHeader(h.name, h.index) for h in sorted(forged, key=lambda h: -h.index)]
    if tx.direction in settings.directions:
        entries = tuple(e for r in ctx.results for e in r.authres)
        edits.append(AddHeader(FIELD, render(ctx.site.authserv_id, entries), top=True))
    if forged:
        return CheckResult(NAME, Result.PASS, edits=tuple(edits),
                           reason=f"deleted {len(forged)} forged field(s)")
    return CheckResult(NAME, Result.NONE, edits=tuple(edits))


class AuthRes(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    after = (EVERY_OTHER,)  # it reports every other check
    safety_edits = True  # forged fields go, and ours is added, in monitor mode too


CHECK = AuthRes(Settings.load, check)
