"""Authentication-Results payloads (RFC 8601 §2.2), as ARC carries them (RFC 8617 §4.1.1).

ARC-Authentication-Results fields come from whoever sealed a chain, and Authentication-Results
fields from whoever sent the message: both are read here by a parser of our own, bounded
(`MAX_VALUE` characters, checked before anything else) and linear: every character is looked
at a constant number of times, comments nest without recursion, and every regular expression
matches a run of one character class. (The authres library recurses once per nested comment:
500 opening parentheses raise RecursionError.)

What it gives: the authserv-id and, per result (`resinfo`), the method, the result, the
properties (`header.from`, `smtp.mailfrom`, …) and the resinfo as written with white space
folded (comments kept), which ARC sealing copies into its ARC-Authentication-Results.
A resinfo that does not parse is left out; a field with an unterminated comment or quoted
string, a stray `)` or no authserv-id is not read at all (None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_VALUE = 16384  # an A-R of a busy receiver is 1-3 KB; RFC 5322 lines are 998 characters
MAX_INSTANCE_DIGITS = 2  # RFC 8617 §4.2.1: i= is 1 to 50

_WS = re.compile(r"[ \t\r\n]+")
_WORD = re.compile(r'[^ \t\r\n()";=\\]+')
_CTEXT = re.compile(r"[^()\\]+")
_QTEXT = re.compile(r'[^"\\]+')
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
_AAR_PREFIX = re.compile(r"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]+)[ \t\r\n]*;")

WORD, QUOTED, SEMI, EQ = "word", "quoted", ";", "="


@dataclass(frozen=True, slots=True)
class ResInfo:
    """One `method=result` clause with its properties (RFC 8601 §2.2)."""

    method: str  # lower case, a method version (`dkim/1`) dropped
    result: str  # lower case
    properties: tuple[tuple[str, str], ...] = ()  # ("header.from", "example.com")
    text: str = ""  # as written, white space runs folded to one space, comments kept

    def get(self, key: str) -> str:
        """The first value of property `key` (`ptype.property`, lower case), or ''."""
        return next((v for k, v in self.properties if k == key), "")


@dataclass(frozen=True, slots=True)
class AuthResults:
    """An Authentication-Results payload: who wrote it, and what it says."""

    authserv_id: str  # as written, quotes removed
    results: tuple[ResInfo, ...] = ()


def _skip_comment(s: str, i: int) -> int:
    """The index after the comment starting at `s[i]` ('('), or -1 if it never ends."""
    depth, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        else:
            m = _CTEXT.match(s, i)
            i = m.end() if m else i + 1
            continue
        i += 1
    return -1


def _quoted_end(s: str, i: int) -> int:
    """The index after the quoted string starting at `s[i]` ('"'), or -1 if it never ends."""
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            m = _QTEXT.match(s, i)
            i = m.end() if m else i + 1
    return -1


Token = tuple[str, str, int, int]  # kind, text, start, end


def tokenize(s: str) -> list[Token] | None:
    """Words, quoted strings, `;` and `=`, comments and white space skipped; None when a
    comment or quoted string does not end or a `)` stands alone."""
    tokens: list[Token] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            m = _WS.match(s, i)
            i = m.end() if m else i + 1
        elif c == "(":
            i = _skip_comment(s, i)
            if i < 0:
                return None
        elif c == '"':
            end = _quoted_end(s, i)
            if end < 0:
                return None
            tokens.append((QUOTED, _ESCAPED.sub(r"\1", s[i + 1:end - 1]), i, end))
            i = end
        elif c in ";=":
            tokens.append((c, c, i, i + 1))
            i += 1
        elif c in ")\\":
            return None
        else:
            m = _WORD.match(s, i)
            end = m.end() if m else i + 1
            last = tokens[-1] if tokens else None
            if last and last[0] == QUOTED and last[3] == i and s[i] == "@":
                # a quoted local-part and its domain are one value (RFC 8601 §2.2 pvalue)
                tokens[-1] = (WORD, last[1] + s[i:end], last[2], end)
            else:
                tokens.append((WORD, s[i:end], i, end))
            i = end
    return tokens


def _value(tokens: list[Token], i: int) -> tuple[str, int]:
    """The property value starting at `tokens[i]`: it runs on through tokens that touch it
    (`x@y`, and `=` inside a dot-atom local-part: `smtp.mailfrom==@example.com`, RFC 8601
    §2.2 pvalue). The value and the index after it; ('', i) when there is none."""
    if i >= len(tokens) or tokens[i][0] == SEMI:
        return "", i
    parts, end = [tokens[i][1]], tokens[i][3]
    i += 1
    while i < len(tokens) and tokens[i][2] == end and tokens[i][0] in (WORD, QUOTED, EQ):
        parts.append(tokens[i][1])
        end = tokens[i][3]
        i += 1
    return "".join(parts), i


def _resinfo(tokens: list[Token], text: str) -> ResInfo | None:
    """`method = result [reason=value] [ptype.property=value ...]`, or None."""
    if len(tokens) < 3 or tokens[0][0] != WORD or tokens[1][0] != EQ or tokens[2][0] != WORD:
        return None
    method = tokens[0][1].partition("/")[0].lower()
    props: list[tuple[str, str]] = []
    i = 3
    while i < len(tokens):
        if i + 1 >= len(tokens) or tokens[i][0] != WORD or tokens[i + 1][0] != EQ:
            return None
        name = tokens[i][1].lower()
        value, i = _value(tokens, i + 2)
        if not value:
            return None
        if name != "reason":
            ptype, dot, prop = name.partition(".")
            if not dot or not ptype or not prop:
                return None
            props.append((name, value))
    return ResInfo(method, tokens[2][1].lower(), tuple(props), text)


def parse(value: str, *, limit: int | None = MAX_VALUE) -> AuthResults | None:
    """Read an Authentication-Results payload (the field value); None when longer than
    `limit` or not readable (see the module docstring)."""
    if limit is not None and len(value) > limit:
        return None
    tokens = tokenize(value)
    if tokens is None:
        return None
    segments: list[list[Token]] = [[]]
    bounds = [0]
    for token in tokens:
        if token[0] == SEMI:
            segments.append([])
            bounds.append(token[2] + 1)
        else:
            segments[-1].append(token)
    head = segments[0]
    if not head or head[0][0] not in (WORD, QUOTED) or len(head) > 2:
        return None
    results = []
    for k in range(1, len(segments)):
        seg = segments[k]
        if len(seg) == 1 and seg[0][0] == WORD and seg[0][1].lower() == "none":
            continue  # no-result (RFC 8601 §2.2)
        end = bounds[k + 1] - 1 if k + 1 < len(bounds) else len(value)
        info = _resinfo(seg, " ".join(value[bounds[k]:end].split()))
        if info is not None:
            results.append(info)
    return AuthResults(head[0][1], tuple(results))


def aar_instance(value: str) -> int | None:
    """The instance of an ARC-Authentication-Results value (`i=N;` first, RFC 8617 §4.1.1:
    `arc-info = instance [CFWS] ";" authres-payload`), or None; the range is the caller's."""
    m = _AAR_PREFIX.match(value)
    if m is None or len(m.group(1)) > MAX_INSTANCE_DIGITS:
        return None
    return int(m.group(1))


def parse_aar(value: str, *, limit: int | None = MAX_VALUE) -> tuple[int, AuthResults] | None:
    """An ARC-Authentication-Results value: its instance and payload, or None."""
    if limit is not None and len(value) > limit:
        return None
    instance = aar_instance(value)
    m = _AAR_PREFIX.match(value)
    if instance is None or m is None:
        return None
    payload = parse(value[m.end():], limit=None)
    return None if payload is None else (instance, payload)
