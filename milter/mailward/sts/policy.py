"""MTA-STS (RFC 8461), the pure part: the `_mta-sts` TXT record, the policy file, MX patterns,
and the answer Postfix's TLS policy table gets. No I/O; every input here is written by someone
else (the recipient domain, or whoever sits between us and it), so every parser refuses what
the RFC's grammar does not allow and never raises anything but `PolicyError`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: at most a year
MAX_MX = 64  # patterns kept from one policy; more is no real domain's list
MAX_LINES = 512

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})+")
_VCHAR = r"[^\x00-\x20\x7f]"  # printable, UTF-8 allowed (extension values)
_FIELD = re.compile(rf"([A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}):[ \t]*"
                    rf"({_VCHAR}(?:[^\x00-\x1f\x7f]*{_VCHAR})?)?[ \t]*")


class PolicyError(ValueError):
    """A record or policy the RFC's grammar refuses; the message says where."""


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy file (RFC 8461 §3.2)."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]  # lower case; `*.` only as the whole first label


def parse_txt(records: tuple[bytes, ...]) -> str | None:
    """The policy `id` of the `_mta-sts` TXT records (RFC 8461 §3.1), or None when there is no
    usable record: none begins with `v=STSv1`, more than one does, or that one is invalid."""
    ours = [r for r in records if r.startswith(b"v=STSv1") and r[7:8] in (b"", b";", b" ", b"\t")]
    if len(ours) != 1:
        return None
    try:
        text = ours[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the grammar allows one trailing ";"
    if not fields or fields[0] != "v=STSv1":
        return None
    found: str | None = None
    for item in fields[1:]:
        name, sep, value = item.partition("=")
        if not sep:
            return None
        if name == "id":
            if found is not None or not _TXT_ID.fullmatch(value):
                return None
            found = value
        elif not (_EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            return None
    return found


def valid_pattern(pattern: str) -> bool:
    """An `mx` value: a domain name, optionally with `*.` as its whole first label."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    return bool(_DOMAIN.fullmatch(name))


def parse_policy(text: str) -> Policy:
    """A policy file's text (RFC 8461 §3.2). Lines end in LF or CRLF; `version`, `mode` and
    `max_age` must each appear once, `mx` at least once unless the mode is `none`; fields
    nobody knows are ignored (extensions), but must still be well formed."""
    seen, mx = _fields(text)
    if seen.get("version") != "STSv1":
        raise PolicyError("version is not STSv1" if "version" in seen else "no version")
    try:
        mode = Mode(seen.get("mode", ""))
    except ValueError:
        raise PolicyError(f"mode {seen.get('mode')!r} is not enforce, testing or none"
                          if "mode" in seen else "no mode") from None
    age = seen.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError(f"max_age {age!r} is not 1 to 10 digits" if age else "no max_age")
    if not mx and mode is not Mode.NONE:
        raise PolicyError("no mx pattern")
    return Policy(mode, min(int(age), MAX_AGE_LIMIT), tuple(mx))


def _fields(text: str) -> tuple[dict[str, str], list[str]]:
    """version, mode and max_age (each at most once), and the mx patterns in order."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_LINES:
        raise PolicyError(f"more than {MAX_LINES} lines")
    seen: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(lines, 1):
        m = _FIELD.fullmatch(raw.removesuffix("\r"))
        if not m or m.group(2) is None:
            raise PolicyError(f"line {number}: not a 'key: value' field")
        key, value = m.group(1), m.group(2)
        if key == "mx":
            pattern = value.lower()
            if not valid_pattern(pattern):
                raise PolicyError(f"line {number}: mx {value!r} is not a host name pattern")
            if pattern not in mx:
                mx.append(pattern)
            if len(mx) > MAX_MX:
                raise PolicyError(f"more than {MAX_MX} mx patterns")
        elif key in ("version", "mode", "max_age"):
            if key in seen:
                raise PolicyError(f"line {number}: {key} given twice")
            seen[key] = value
    return seen, mx


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: `*.example.com` matches exactly one more label, the rest exactly."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def postfix_match(pattern: str) -> str:
    """A `match=` word for Postfix's `secure` level. Postfix cannot say "exactly one label":
    `.example.com` is any depth below example.com, the nearest it has to `*.example.com`."""
    return pattern[1:] if pattern.startswith("*.") else pattern


def postfix_answer(policy: Policy) -> str | None:
    """What the TLS policy table says for a domain with this policy: `secure` with the MX
    patterns for `enforce`; nothing (Postfix's own default) for `testing` and `none`."""
    if policy.mode is not Mode.ENFORCE:
        return None
    return "secure match=" + ":".join(postfix_match(p) for p in policy.mx) + \
        " servername=hostname"


def lookup_domain(key: str) -> str | None:
    """The domain a TLS-policy lookup key names, or None for keys MTA-STS has nothing to say
    about: parent-domain probes (`.example.com`), `[host]:port` next hops, IP literals and
    anything that is not a DNS name."""
    name = key.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(name):
        return None
    if name.replace(".", "").isdigit():
        return None  # a dotted IPv4 address, never a mail domain's policy
    return name
