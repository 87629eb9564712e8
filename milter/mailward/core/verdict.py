"""Results of checks and the verdict they combine into, as frozen data."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from mailward.core.transaction import Header


class Result(enum.StrEnum):
    """Result words of RFC 8601 §2.7 (plus `policy`, for a local decision)."""

    PASS = "pass"  # noqa: S105 - a result word, not a password
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"


class Action(enum.StrEnum):
    """What happens to the message. `severity` orders them when checks disagree."""

    ACCEPT = "accept"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


# reject > tempfail > discard > quarantine > accept: a reply the sender sees beats silence,
# and a retry (tempfail) loses nothing where discard would.
_SEVERITY = {
    Action.ACCEPT: 0,
    Action.QUARANTINE: 1,
    Action.DISCARD: 2,
    Action.TEMPFAIL: 3,
    Action.REJECT: 4,
}

class Quarantine(enum.StrEnum):
    """How a quarantined message is kept: Postfix's hold queue (`hold`, smfi_quarantine), or
    delivered with a header naming the reason and an optional subject tag (`tag`), for a Sieve
    rule to file into Junk where the user sees it."""

    HOLD = "hold"
    TAG = "tag"


_REPLY_RE = re.compile(r"([45])\d\d ([45])\.\d{1,3}\.\d{1,3} (\S.*)")
_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e]+")


def safe_text(text: str, *, limit: int = 200) -> str:
    """Printable ASCII only, white space runs folded: safe in an SMTP reply or a header."""
    return " ".join(_UNSAFE_TEXT.sub(" ", text).split())[:limit]


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code (RFC 5321 §4.2), enhanced status (RFC 3463) and text."""

    code: int
    status: str
    text: str

    @classmethod
    def parse(cls, spec: str) -> Reply:
        """Parse `550 5.7.1 Some text`; the code class and status class must agree."""
        m = _REPLY_RE.fullmatch(spec.strip())
        if not m or m.group(1) != m.group(2):
            raise ValueError(spec)
        code, status, text = spec.strip().split(" ", 2)
        return cls(int(code), status, safe_text(text))

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class DeleteHeader:
    """Delete the `index`-th (1-based, per name) field called `name`."""

    name: str
    index: int


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the value of the `index`-th field called `name`."""

    name: str
    index: int
    value: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Add a field: at the top when `top`, else at the end of the header."""

    name: str
    value: str
    top: bool = False


HeaderEdit = DeleteHeader | ChangeHeader | AddHeader


@dataclass(frozen=True, slots=True)
class AuthResEntry:
    """One `method=result` clause of an Authentication-Results field (RFC 8601 §2.2)."""

    method: str
    result: Result
    reason: str = ""
    properties: tuple[tuple[str, str, str], ...] = ()  # (ptype, property, value)
    comment: str = ""  # after the result: `arc=pass (i=2)`


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one check found and what it asks for.

    `would` is set instead of acting when the check runs in monitor mode: the action (and
    edits) it would have taken. `outcome` is typed data for later checks (core/outcomes.py),
    found by type with `Context.outcome`.
    """

    check: str
    result: Result
    action: Action = Action.ACCEPT
    reply: Reply | None = None
    reason: str = ""
    edits: tuple[HeaderEdit, ...] = ()
    authres: tuple[AuthResEntry, ...] = ()
    would: Action | None = None
    outcome: object = field(default=None, compare=False)  # typed data for later checks
    internal_error: bool = False  # the check raised: its result is a stand-in


@dataclass(frozen=True, slots=True)
class Verdict:
    """The single answer for a message (or a recipient, before DATA)."""

    action: Action
    reply: Reply | None = None
    edits: tuple[HeaderEdit, ...] = ()
    quarantine_reason: str = ""
    results: tuple[CheckResult, ...] = ()
    decided_by: str = ""
    quarantine: Quarantine = Quarantine.HOLD  # how a QUARANTINE verdict is carried out


def order_edits(edits: list[HeaderEdit]) -> tuple[HeaderEdit, ...]:
    """Edits in an order the MTA can apply safely: deletions and changes first, per field
    name highest index first (so no deletion shifts a later one), then additions."""
    # One edit per field (names compare without case): two checks deleting the same field
    # must delete it once, and a deletion beats a change of the same field.
    by_field: dict[tuple[str, int], DeleteHeader | ChangeHeader] = {}
    for e in edits:
        if isinstance(e, AddHeader):
            continue
        key = (e.name.lower(), e.index)
        if key not in by_field or (isinstance(e, DeleteHeader)
                                   and not isinstance(by_field[key], DeleteHeader)):
            by_field[key] = e
    indexed = sorted(by_field.values(), key=lambda e: (e.name.lower(), -e.index))
    return (*indexed, *(e for e in edits if isinstance(e, AddHeader)))


def apply_edits(headers: tuple[Header, ...], edits: tuple[HeaderEdit, ...]
                ) -> list[tuple[str, str]]:
    """The header as the MTA will have it after `edits` (for signing what leaves).

    Values keep the milter convention: a changed or added value gets one leading space.
    """
    ordered = order_edits(list(edits))
    fields: list[tuple[str, str] | None] = [(h.name, h.value) for h in headers]
    positions: dict[tuple[str, int], int] = {
        (h.name.lower(), h.index): i for i, h in enumerate(headers)}
    for e in ordered:
        if isinstance(e, DeleteHeader | ChangeHeader):
            i = positions.get((e.name.lower(), e.index))
            if i is None or fields[i] is None:
                continue
            fields[i] = None if isinstance(e, DeleteHeader) else (e.name,
                                                                  " " + e.value.lstrip())
    out = [f for f in fields if f is not None]
    for e in ordered:
        if isinstance(e, AddHeader):
            if e.top:
                out.insert(0, (e.name, " " + e.value))
            else:
                out.append((e.name, " " + e.value))
    return out
