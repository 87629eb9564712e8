"""Reading INI sections into typed values, with errors that name the place.

Every error names the file, the section, the key, the bad value and what was expected, e.g.
`ConfigError: mailward.ini: [check.tls] min_version: expected one of TLSv1, ..., got 'TLS9'`.
A `Section` remembers which keys were read, so unknown keys are refused too: a typo must never
silently disable a check. This module knows no section or check by name.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import NamedTuple, TypeVar

from mailward.core.verdict import Reply
from mailward.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")



class Key(NamedTuple):
    """One key as the code reads it: what `recording` collects for the generated reference."""

    section: str
    key: str
    expected: str
    default: object


_RECORD: ContextVar[dict[tuple[str, str], Key] | None] = ContextVar("ini_record", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[tuple[str, str], Key]]:
    """Collect every key read (section, name, expected form, default) while the block runs."""
    found: dict[tuple[str, str], Key] = {}
    token = _RECORD.set(found)
    try:
        yield found
    finally:
        _RECORD.reset(token)


_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_SIZE_RE = re.compile(r"(\d+)\s*([kKmMgG]?)[bB]?")
DOMAIN_RE = re.compile(r"(?=.{1,253}\Z)([a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                       r"[a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?\.?", re.IGNORECASE)


class Section:
    """Typed access to one INI section; remembers which keys were read to reject the rest."""

    def __init__(self, path: str, name: str, items: Mapping[str, str]) -> None:
        self.path = path
        self.name = name
        self._items = dict(items)
        self._used: set[str] = set()

    def error(self, key: str, expected: str, value: str | None = None) -> ConfigError:
        got = "" if value is None else f", got {value!r}"
        return ConfigError(f"{self.path}: [{self.name}] {key}: expected {expected}{got}")

    def _raw(self, key: str) -> str | None:
        self._used.add(key)
        value = self._items.get(key)
        return None if value is None else value.strip()

    def _note(self, key: str, expected: str, default: object) -> None:
        found = _RECORD.get()
        if found is not None:  # the last, most specific description wins
            found[(self.name, key)] = Key(self.name, key, expected, default)

    def parse(self, key: str, default: T, expected: str, convert: Callable[[str], T]) -> T:
        """Convert the key's value with `convert`; a ValueError names the key and `expected`."""
        self._note(key, expected, default)
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError:
            raise self.error(key, expected, raw) from None

    def string(self, key: str, default: str) -> str:
        return self.parse(key, default, "a string", str)

    def boolean(self, key: str, default: bool) -> bool:
        def convert(raw: str) -> bool:
            if raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError(raw)

        return self.parse(key, default, "yes or no", convert)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**63) -> int:
        def convert(raw: str) -> int:
            value = int(raw)
            if not minimum <= value <= maximum:
                raise ValueError(raw)
            return value

        return self.parse(key, default, f"an integer from {minimum} to {maximum}", convert)

    def seconds(self, key: str, default: float, *, maximum: float = 86400.0) -> float:
        def convert(raw: str) -> float:
            value = float(raw.removesuffix("s"))
            if not 0 < value <= maximum:
                raise ValueError(raw)
            return value

        return self.parse(key, default, f"seconds (greater than 0, at most {maximum:g})", convert)

    def size(self, key: str, default: int) -> int:
        def convert(raw: str) -> int:
            m = _SIZE_RE.fullmatch(raw)
            if not m:
                raise ValueError(raw)
            return int(m.group(1)) * int(1024 ** " kmg".index((m.group(2) or " ").lower()))

        return self.parse(key, default, "a size in bytes (suffix K, M or G allowed)", convert)

    def choice(self, key: str, enum_type: type[E], default: E,
               allowed: Iterable[E] | None = None) -> E:
        options = list(allowed if allowed is not None else enum_type)
        names = ", ".join(str(o.value) for o in options)

        def convert(raw: str) -> E:
            for option in options:
                if str(option.value) == raw.lower():
                    return option
            raise ValueError(raw)

        return self.parse(key, default, f"one of {names}", convert)

    def option(self, key: str, default: str, options: tuple[str, ...]) -> str:
        """One word out of `options` (compared without case)."""
        def convert(raw: str) -> str:
            if raw.lower() not in options:
                raise ValueError(raw)
            return raw.lower()

        expected = (" or ".join(options) if len(options) == 2
                    else "one of " + ", ".join(options))
        return self.parse(key, default, expected, convert)

    def words(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma- or space-separated list."""
        self._note(key, "a list of words", default)
        raw = self._raw(key)
        if raw is None:
            return default
        return tuple(w for w in re.split(r"[\s,]+", raw) if w)

    def domains(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        out = []
        words = self.words(key, default)
        self._note(key, "a list of domain names", default)
        for word in words:
            if not DOMAIN_RE.fullmatch(word):
                raise self.error(key, "a list of domain names", word)
            out.append(word.rstrip(".").lower())
        return tuple(out)

    def networks(self, key: str, default: tuple[str, ...]) -> tuple[IPNetwork, ...]:
        out = []
        words = self.words(key, default)
        self._note(key, "a list of IP networks", default)
        for word in words:
            try:
                out.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                raise self.error(key, "a list of IP networks such as 192.0.2.0/24 or 2001:db8::/32",
                                 word) from None
        return tuple(out)

    def reply(self, key: str, default: str, *, temporary: bool) -> Reply:
        cls = "4" if temporary else "5"
        expected = f"an SMTP reply '{cls}XX {cls}.X.X text' (RFC 5321 §4.2, RFC 3463)"

        def convert(raw: str) -> Reply:
            reply = Reply.parse(raw)
            if str(reply.code)[0] != cls:
                raise ValueError(raw)
            return reply

        return self.parse(key, Reply.parse(default), expected, convert)

    def enums(self, key: str, enum_type: type[E], default: tuple[E, ...]) -> tuple[E, ...]:
        """A comma- or space-separated list of `enum_type` values (e.g. directions)."""
        names = ", ".join(str(o.value) for o in enum_type)

        def convert(raw: str) -> tuple[E, ...]:
            return tuple(enum_type(w) for w in re.split(r"[\s,]+", raw.lower()) if w)

        return self.parse(key, default, f"a list of {names}", convert)

    def finish(self) -> None:
        """Refuse keys nobody asked for: they are typos or options of another section."""
        unknown = sorted(set(self._items) - self._used)
        if unknown:
            known = ", ".join(sorted(self._used))
            raise self.error(unknown[0], f"a known key of this section ({known})",
                             self._items[unknown[0]])
