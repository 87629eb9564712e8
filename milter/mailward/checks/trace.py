"""trace: outbound mail must not carry our internal topology to the outside world.

On outbound mail, each `Received:` field that came with the message and names an address from
`[milter] trusted_networks`, a private range (RFC 1918, RFC 6598, loopback, link-local,
RFC 4193) or a host from `internal_hosts` is deleted (`action = remove`) or has those names
and addresses replaced (`action = rewrite`: hosts become `redacted.invalid`, address
literals `[redacted]`). Fields in `strip_headers` (default `X-Originating-IP`) are deleted.
Inbound and internal mail is left alone. A Received field longer than 4096 characters is
deleted from outbound mail unread (a genuine one is a line or two).

The MTA's own `Received:` for the submission hop is never shown to milters (Postfix hides
it); see the README for the Postfix setting that handles that hop.

Results: none = nothing to do (or not outbound); pass = fields were sanitised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailward.core.check import Context, ModuleCheck
from mailward.core.ini import IPNetwork, Section
from mailward.core.nets import PRIVATE_NETWORKS, in_networks, parse_ip
from mailward.core.transaction import Direction, Header, Stage, Transaction
from mailward.core.verdict import ChangeHeader, CheckResult, DeleteHeader, HeaderEdit, Result

NAME = "trace"

# Runs of the characters host names and address literals are made of. One pass, no
# backtracking: the former patterns took 6 s on 100 KB of hex digits (issue 7).
_RUN = re.compile(r"[A-Za-z0-9_.:-]+")
# A Received field is a line or two (RFC 5321 §4.4). A longer one is deleted on outbound mail
# without being read, which also bounds the work per field.
MAX_FIELD = 4096


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


def _redact(run: str, networks: tuple[IPNetwork, ...], settings: Settings) -> str | None:
    """The replacement for one run of a trace field if it names something internal."""
    address = parse_ip(run)
    if address is not None and in_networks(address, networks):
        return "redacted"
    if ":" in run:  # host:port, address:port, an IPv4 inside IPv6 (::10.1.2.3): each part
        parts = [_redact(part, networks, settings) for part in run.split(":")]
        if all(p is None for p in parts):
            return None
        return ":".join(p if p is not None else orig
                        for p, orig in zip(parts, run.split(":"), strict=True))
    if address is not None:
        return None
    host = run.rstrip(".")
    if "." in host and _internal_host(host, settings.internal_hosts):
        return "redacted.invalid" + run[len(host):]
    return None


def _sanitise(header: Header, settings: Settings, ctx: Context) -> str | None:
    """The rewritten value if `header` leaks something internal, else None."""
    networks = ctx.site.trusted_networks + PRIVATE_NETWORKS
    leaked = False

    def replace(m: re.Match[str]) -> str:
        nonlocal leaked
        out = _redact(m.group(0), networks, settings)
        if out is None:
            return m.group(0)
        leaked = True
        return out

    value = _RUN.sub(replace, header.value)
    return value if leaked else None


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Sanitise trace fields of outbound mail (see the module docstring)."""
    strip = {h.lower() for h in settings.strip_headers}
    edits: list[HeaderEdit] = []
    for h in tx.headers:
        if h.name.lower() in strip:
            edits.append(DeleteHeader(h.name, h.index))
        elif h.name.lower() == "received" and len(h.value) > MAX_FIELD:
            edits.append(DeleteHeader(h.name, h.index))  # too long to vouch for: not sent on
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


class Trace(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})
    directions = frozenset({Direction.OUTBOUND})


CHECK = Trace(Settings.load, check)
