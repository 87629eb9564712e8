"""RFC 5322 author addresses: the Author Domain a reader sees (RFC 9989 §5.3.1).

The From field is read the way mail readers read it: comments, white space and folds (CFWS)
may stand anywhere between tokens, so `ceo@ bank.example`, `ceo@(x)bank.example` and
`ceo@bank .example` all name bank.example. Quoted strings and domain literals are tokens of
their own, so `"ceo@bank.example" <x@evil.example>` names evil.example.

The parser is ours and linear: one pass tokenizes (nested comments by a depth counter, no
recursion, no regular expression), a second splits the address list. The field's size and its
address count are capped before anything else (RFC 5322 §2.1.1 limits a line to 998
characters; no genuine From comes near the caps). The standard library is not used: its
parsers are not linear on hostile input and differ between Python builds.

Outcomes (`Authors.problem`):
- none: every address parsed; `domains` holds the distinct Author Domains (A-labels).
- `NO_FIELD`, `NO_ADDRESS`: no From field, or one naming no domain (a phrase, an empty
  group, a domain literal): DMARC does not apply.
- `MALFORMED`: the field names a domain (there is an `@`) but no domain can be read from it
  with certainty, or it is over the caps. Mail readers may still show a domain: refuse.
- `MULTIPLE_FIELDS`: more than one From field (RFC 5322 §3.6 allows exactly one).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from mailward.core.transaction import Transaction

MAX_FROM_LENGTH = 8192  # characters of one From field, folds included
MAX_AUTHORS = 32  # addresses in one From field (RFC 9989 §11.5: limit the Author Domains)

_SPECIALS = frozenset('<>@,;:.')
_ATOM_STOP = frozenset('<>@,;:.()[]"\\ \t\r\n')
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class AuthorProblem(enum.StrEnum):
    NO_FIELD = "no From field"
    NO_ADDRESS = "no author domain in From"
    MALFORMED = "malformed From"
    MULTIPLE_FIELDS = "several From fields"


class Malformed(ValueError):
    """The field cannot be read with certainty; the message says where."""


class Tok(enum.Enum):
    ATOM = 1
    QUOTED = 2
    LITERAL = 3  # a domain literal, [...]
    SPECIAL = 4


Token = tuple[Tok, str]


def _end_of_comment(value: str, i: int) -> int:
    """The index after the (nested) comment opening at `i`."""
    depth, i, n = 1, i + 1, len(value)
    while i < n and depth:
        c = value[i]
        if c == "\\":
            i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        i += 1
    if depth:
        raise Malformed("unterminated comment")
    return i


def _delimited(value: str, i: int, close: str) -> tuple[str, int]:
    """The content of a quoted string or domain literal opening at `i`, and the index after
    it; quoted pairs are unquoted and folds dropped (RFC 5322 §3.2.4, §3.4.1)."""
    start, parts, i, n = i, [], i + 1, len(value)
    while i < n and value[i] != close:
        if value[i] == "\\":
            i += 1
        if value[i:i + 1] not in ("\r", "\n"):
            parts.append(value[i:i + 1])
        i += 1
    if i >= n:
        what = "quoted string" if close == '"' else "domain literal"
        raise Malformed(f"unterminated {what} at {start}")
    return "".join(parts), i + 1


def tokenize(value: str) -> list[Token]:
    """Split a structured field into tokens, dropping CFWS (RFC 5322 §3.2.2). Linear."""
    tokens: list[Token] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            i = _end_of_comment(value, i)
        elif c == '"':
            text, i = _delimited(value, i, '"')
            tokens.append((Tok.QUOTED, text))
        elif c == "[":
            text, i = _delimited(value, i, "]")
            tokens.append((Tok.LITERAL, text))
        elif c in _SPECIALS:
            tokens.append((Tok.SPECIAL, c))
            i += 1
        elif c in ")]\\":
            raise Malformed(f"stray {c!r}")
        else:
            start = i
            while i < n and value[i] not in _ATOM_STOP:
                i += 1
            tokens.append((Tok.ATOM, value[start:i]))
    return tokens


def normalise_domain(domain: str) -> str | None:
    """A-label, lower case, no trailing dot; None if it is no domain name (RFC 5890 §2.3)."""
    domain = domain.strip().rstrip(".")
    if not domain or len(domain) > 253 * 4:
        return None
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    if len(ascii_domain) > 253:
        return None
    for label in ascii_domain.split("."):
        if not 0 < len(label) < 64 or not set(label) <= _LDH or label[0] == "-" \
                or label[-1] == "-":
            return None
    return ascii_domain


def _quote(text: str) -> str:
    """A quoted string again, as RFC 5322 §3.2.4 writes it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split(tokens: list[Token]) -> list[list[Token]]:
    """The address list's elements: split at `,`, and at a group's `:` and `;`, outside <>."""
    pieces: list[list[Token]] = [[]]
    angle = False
    for kind, text in tokens:
        if kind is Tok.SPECIAL and text == "<":
            if angle:
                raise Malformed("nested <")
            angle = True
        elif kind is Tok.SPECIAL and text == ">":
            if not angle:
                raise Malformed("stray >")
            angle = False
        elif kind is Tok.SPECIAL and not angle and text in ",;":
            pieces.append([])
            continue
        elif kind is Tok.SPECIAL and not angle and text == ":":
            phrase = pieces[-1]  # a group's display name (RFC 5322 §3.4)
            if not phrase or any(k not in (Tok.ATOM, Tok.QUOTED) for k, _ in phrase):
                raise Malformed("a group name must be a phrase")
            pieces[-1] = []
            continue
        pieces[-1].append((kind, text))
    if angle:
        raise Malformed("unterminated <")
    return [p for p in pieces if p]


def _is_phrase(tokens: list[Token]) -> bool:
    """Words and quoted strings, dots allowed (RFC 5322 §3.2.5 phrase, §4.1 obs-phrase)."""
    return all(k in (Tok.ATOM, Tok.QUOTED) or (k, t) == (Tok.SPECIAL, ".")
               for k, t in tokens)


def _addr_spec(piece: list[Token]) -> list[Token]:
    """The addr-spec of a name-addr (`phrase <addr-spec>`), or the piece itself."""
    opens = [i for i, (k, t) in enumerate(piece) if (k, t) == (Tok.SPECIAL, "<")]
    if not opens:
        return piece
    phrase, rest = piece[:opens[0]], piece[opens[0] + 1:]
    if not rest or rest[-1] != (Tok.SPECIAL, ">") or any(
            k is Tok.SPECIAL and t in "<>" for k, t in rest[:-1]):
        raise Malformed("text after <address>, or a second <address>")
    if not _is_phrase(phrase):
        raise Malformed("special characters in a display name")
    spec = rest[:-1]
    colons = [i for i, (k, t) in enumerate(spec) if (k, t) == (Tok.SPECIAL, ":")]
    if colons:  # obs-route: <@a.example,@b.example:user@c.example> (RFC 5322 §4.4)
        spec = spec[colons[-1] + 1:]
    if not spec:
        raise Malformed("an empty <>")
    return spec


def _domain(tokens: list[Token]) -> str:
    """The domain of an addr-spec as written: atoms joined by dots, or a literal."""
    if len(tokens) == 1 and tokens[0][0] is Tok.LITERAL:
        return "[" + tokens[0][1] + "]"
    if not tokens:
        raise Malformed("no domain after @")
    for i, (k, t) in enumerate(tokens):
        want = Tok.ATOM if i % 2 == 0 else Tok.SPECIAL
        if k is not want or (k is Tok.SPECIAL and t != "."):
            raise Malformed("a bad domain")
    return "".join(t for _, t in tokens)


def _mailbox(piece: list[Token]) -> tuple[str, str] | None:
    """(local part, domain as written) of one element; None for a phrase without address."""
    spec = _addr_spec(piece)
    ats = [i for i, (k, t) in enumerate(spec) if (k, t) == (Tok.SPECIAL, "@")]
    if not ats:
        if spec is piece and _is_phrase(piece):
            return None  # a phrase naming nobody, e.g. "undisclosed"
        raise Malformed("an address without @")
    if len(ats) > 1:
        raise Malformed("more than one @ in an address")
    local = spec[:ats[0]]
    if not local or not _is_phrase(local):
        raise Malformed("a bad local part")
    local_text = "".join(_quote(t) if k is Tok.QUOTED else t for k, t in local)
    return local_text, _domain(spec[ats[0] + 1:])


@dataclass(frozen=True, slots=True)
class Authors:
    """The author addresses of a message: (local part as written, A-label domain) each."""

    addresses: tuple[tuple[str, str], ...] = ()
    problem: AuthorProblem | None = None
    detail: str = ""

    @property
    def domains(self) -> tuple[str, ...]:
        """The distinct Author Domains, in order of appearance."""
        return tuple(dict.fromkeys(d for _, d in self.addresses))

    @property
    def reason(self) -> str:
        if self.problem is None:
            return ""
        return f"{self.problem}: {self.detail}" if self.detail else str(self.problem)


def parse_authors(values: list[str] | tuple[str, ...]) -> Authors:
    """The authors named by the values of the From field(s) (see the module docstring)."""
    if not values:
        return Authors(problem=AuthorProblem.NO_FIELD)
    if len(values) > 1:
        return Authors(problem=AuthorProblem.MULTIPLE_FIELDS, detail=f"{len(values)} fields")
    value = values[0]
    if len(value) > MAX_FROM_LENGTH:
        return Authors(problem=AuthorProblem.MALFORMED,
                       detail=f"longer than {MAX_FROM_LENGTH} characters")
    if value.count("@") > 4 * MAX_AUTHORS:
        return Authors(problem=AuthorProblem.MALFORMED, detail="too many @")
    try:
        found = [m for p in _split(tokenize(value)) if (m := _mailbox(p)) is not None]
    except Malformed as exc:
        return Authors(problem=AuthorProblem.MALFORMED, detail=str(exc))
    if len(found) > MAX_AUTHORS:
        return Authors(problem=AuthorProblem.MALFORMED,
                       detail=f"more than {MAX_AUTHORS} addresses")
    addresses = []
    for local, domain in found:
        if domain.startswith("["):
            return Authors(problem=AuthorProblem.NO_ADDRESS, detail="a domain literal")
        norm = normalise_domain(domain)
        if norm is None:
            return Authors(problem=AuthorProblem.MALFORMED, detail="not a domain name")
        addresses.append((local, norm))
    if not addresses:
        return Authors(problem=AuthorProblem.NO_ADDRESS)
    return Authors(tuple(addresses))


def authors(tx: Transaction) -> Authors:
    """The authors of `tx` (its From fields, as received). Several checks ask for the same
    message; a small cache parses each From once (bounded: 128 fields of at most 8 KiB)."""
    values = tuple(h.value for h in tx.get_all("From"))
    if sum(len(v) for v in values) > MAX_FROM_LENGTH:
        return parse_authors(values)  # refused by its length at once; not worth keeping
    return _parse_cached(values)


@functools.lru_cache(maxsize=128)
def _parse_cached(values: tuple[str, ...]) -> Authors:
    return parse_authors(values)
