"""trace: outbound mail must not carry our internal topology to the outside world.

On outbound mail, each `Received:` field that came with the message and names an address from
`[milter] trusted_networks`, a private range (RFC 1918, RFC 6598, loopback, link-local,
RFC 4193) or a host from `internal_hosts` is deleted (`action = remove`) or has those names
and addresses replaced (`action = rewrite`: hosts become `redacted.invalid`, address
literals `[redacted]`). Fields in `strip_headers` (default `X-Originating-IP`) are deleted.
Inbound and internal mail is left alone.

The MTA's own `Received:` for the submission hop is never shown to milters (Postfix hides
it); see the README for the Postfix setting that handles that hop.

Results: none = nothing to do (or not outbound); pass = fields were sanitised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailward.core.check import Check, Context
from mailward.core.ini import Section
from mailward.core.nets import PRIVATE_NETWORKS, in_networks, parse_ip
from mailward.core.transaction import Direction, Header, Stage, Transaction
from mailward.core.verdict import ChangeHeader, CheckResult, DeleteHeader, HeaderEdit, Result

NAME = "trace"

# Candidate IP literals: IPv4 dotted quads and anything IPv6-shaped (validated by parse_ip).
_IP_RE = re.compile(r"(?:IPv6:)?[0-9A-Fa-f:]*:[0-9A-Fa-f:.]+|\b\d{1,3}(?:\.\d{1,3}){3}\b")
_HOST_RE = re.compile(r"\b[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\b")


@dataclass(frozen=True)
class Settings:
    """[check.trace]"""

    action: str = "remove"  # or "rewrite"
    internal_hosts: tuple[str, ...] = ()
    strip_headers: tuple[str, ...] = ("X-Originating-IP",)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        return cls(
            action=sec.option("action", cls.action, ("remove", "rewrite")),
            internal_hosts=sec.domains("internal_hosts"),
            strip_headers=sec.words("strip_headers", cls.strip_headers),
        )


def _internal_host(name: str, internal_hosts: tuple[str, ...]) -> bool:
    """`name` is one of `internal_hosts` or lies below one of them."""
    name = name.lower().rstrip(".")
    return any(name == h or name.endswith("." + h) for h in internal_hosts)


def _sanitise(header: Header, settings: Settings, ctx: Context) -> str | None:
    """The rewritten value if `header` leaks something internal, else None."""
    networks = ctx.site.trusted_networks + PRIVATE_NETWORKS
    leaked = False

    def ip(m: re.Match[str]) -> str:
        nonlocal leaked
        if in_networks(parse_ip(m.group(0)), networks):
            leaked = True
            return "redacted"
        return m.group(0)

    def host(m: re.Match[str]) -> str:
        nonlocal leaked
        if parse_ip(m.group(0)) is None and _internal_host(m.group(0), settings.internal_hosts):
            leaked = True
            return "redacted.invalid"
        return m.group(0)

    value = _IP_RE.sub(ip, header.value)
    value = _HOST_RE.sub(host, value)
    return value if leaked else None


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Sanitise trace fields of outbound mail (see the module docstring)."""
    strip = {h.lower() for h in settings.strip_headers}
    edits: list[HeaderEdit] = []
    for h in tx.headers:
        if h.name.lower() in strip:
            edits.append(DeleteHeader(h.name, h.index))
        elif h.name.lower() == "received":
            rewritten = _sanitise(h, settings, ctx)
            if rewritten is None:
                continue
            if settings.action == "rewrite":
                edits.append(ChangeHeader(h.name, h.index, rewritten))
            else:
                edits.append(DeleteHeader(h.name, h.index))
    if not edits:
        return CheckResult(NAME, Result.NONE)
    deleted = sum(isinstance(e, DeleteHeader) for e in edits)
    return CheckResult(NAME, Result.PASS, edits=tuple(edits),
                       reason=f"deleted {deleted}, rewrote {len(edits) - deleted} field(s)")


class Trace(Check[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.OUTBOUND})

    def load(self, sec: Section) -> Settings:
        return Settings.load(sec)

    def run(self, tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
        return check(tx, ctx, settings)


CHECK = Trace()
