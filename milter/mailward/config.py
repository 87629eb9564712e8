"""The INI configuration, parsed once into frozen, typed objects.

Every error names the file, the section, the key, the bad value and what was expected, e.g.
`ConfigError: mailward.ini: [check.tls] min_version: expected one of TLSv1, ..., got 'TLS9'`.
Unknown sections and keys are errors too: a typo must never silently disable a check.
"""

from __future__ import annotations

import configparser
import dataclasses
import enum
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from mailward.errors import ConfigError
from mailward.verdict import Action, Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}
_SIZE_RE = re.compile(r"(\d+)\s*([kKmMgG]?)[bB]?")
_DOMAIN_RE = re.compile(r"(?=.{1,253}\Z)([a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                        r"[a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?\.?", re.IGNORECASE)


class Mode(enum.StrEnum):
    """enforce: act on results. monitor: accept, but log and tag what would have happened."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


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

    def parse(self, key: str, default: T, expected: str, convert: Callable[[str], T]) -> T:
        """Convert the key's value with `convert`; a ValueError names the key and `expected`."""
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
        raw = self._raw(key)
        if raw is None:
            return default
        return tuple(w for w in re.split(r"[\s,]+", raw) if w)

    def domains(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        out = []
        for word in self.words(key, default):
            if not _DOMAIN_RE.fullmatch(word):
                raise self.error(key, "a list of domain names", word)
            out.append(word.rstrip(".").lower())
        return tuple(out)

    def networks(self, key: str, default: tuple[str, ...]) -> tuple[IPNetwork, ...]:
        out = []
        for word in self.words(key, default):
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

    def finish(self) -> None:
        """Refuse keys nobody asked for: they are typos or options of another section."""
        unknown = sorted(set(self._items) - self._used)
        if unknown:
            known = ", ".join(sorted(self._used))
            raise self.error(unknown[0], f"a known key of this section ({known})",
                             self._items[unknown[0]])


# -- sockets ---------------------------------------------------------------------------------

def parse_socket(spec: str) -> str:
    """Validate a libmilter socket spec: `inet:PORT@HOST`, `inet6:PORT@HOST`, `unix:/path`."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(spec)
    if kind in ("unix", "local"):
        if not rest.startswith("/") or "\0" in rest:
            raise ValueError(spec)
        return spec
    if kind not in ("inet", "inet6"):
        raise ValueError(spec)
    port, at, host = rest.partition("@")
    if not at or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(spec)
    if kind == "inet6":
        ipaddress.IPv6Address(host)
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _DOMAIN_RE.fullmatch(host):
                raise
    return spec


def parse_listen(spec: str) -> tuple[str, int] | None:
    """`HOST:PORT` or `[V6]:PORT`; empty disables."""
    if not spec:
        return None
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(spec)
    ipaddress.ip_address(host)
    return host, int(port)


# -- sections --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MilterSettings:
    """[milter]: how we talk to the MTA and what we consider ours."""

    socket: str = "inet:8895@127.0.0.1"
    timeout: float = 60.0
    authserv_id: str = ""
    mode: Mode = Mode.ENFORCE
    trusted_networks: tuple[IPNetwork, ...] = ()
    originating_daemons: tuple[str, ...] = ("ORIGINATING",)
    local_domains: tuple[str, ...] = ()
    spool_threshold: int = 1024 * 1024
    log_level: str = "info"

    @classmethod
    def load(cls, sec: Section) -> MilterSettings:
        # getfqdn() may ask DNS: only when the key is not set
        authserv_id = (sec.parse("authserv_id", "", "a host name", _hostname)
                       or socket.getfqdn().lower())
        return cls(
            socket=sec.parse("socket", cls.socket,
                             "inet:PORT@HOST, inet6:PORT@ADDRESS or unix:/absolute/path",
                             parse_socket),
            timeout=sec.seconds("timeout", cls.timeout, maximum=3600),
            authserv_id=authserv_id,
            mode=sec.choice("mode", Mode, Mode.ENFORCE),
            trusted_networks=sec.networks("trusted_networks", ("127.0.0.0/8", "::1/128")),
            originating_daemons=sec.words("originating_daemons", cls.originating_daemons),
            local_domains=sec.domains("local_domains"),
            spool_threshold=sec.size("spool_threshold", cls.spool_threshold),
            log_level=sec.parse("log_level", "info", "one of debug, info, warning, error",
                                _log_level),
        )


def _hostname(raw: str) -> str:
    if not _DOMAIN_RE.fullmatch(raw):
        raise ValueError(raw)
    return raw.rstrip(".").lower()


def _log_level(raw: str) -> str:
    if raw.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(raw)
    return raw.lower()


def parse_nameserver(word: str) -> tuple[str, int]:
    """`192.0.2.1`, `192.0.2.1:5353`, `2001:db8::1` or `[2001:db8::1]:5353`."""
    if word.startswith("["):
        host, _, port = word[1:].partition("]")
        port = port.removeprefix(":") or "53"
    elif word.count(":") == 1:
        host, port = word.split(":")
    else:
        host, port = word, "53"
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(word)
    return host, int(port)


@dataclass(frozen=True)
class DnsSettings:
    """[dns]: the one resolver every check uses."""

    nameservers: tuple[tuple[str, int], ...] = ()  # empty: those of /etc/resolv.conf
    timeout: float = 2.0  # per try
    lifetime: float = 5.0  # per lookup, retries included
    cache_size: int = 10000
    max_ttl: int = 86400
    negative_ttl: int = 300  # NXDOMAIN/NODATA without an SOA to say otherwise

    @classmethod
    def load(cls, sec: Section) -> DnsSettings:
        servers = []
        for word in sec.words("nameservers", ()):
            try:
                servers.append(parse_nameserver(word))
            except ValueError:
                raise sec.error("nameservers", "IP addresses, each with an optional :PORT "
                                "([v6]:PORT)", word) from None
        timeout = sec.seconds("timeout", cls.timeout, maximum=60)
        lifetime = sec.seconds("lifetime", cls.lifetime, maximum=300)
        if lifetime < timeout:
            raise sec.error("lifetime", f"at least timeout ({timeout:g})", str(lifetime))
        return cls(
            nameservers=tuple(servers), timeout=timeout, lifetime=lifetime,
            cache_size=sec.integer("cache_size", cls.cache_size, maximum=10_000_000),
            max_ttl=sec.integer("max_ttl", cls.max_ttl, minimum=1, maximum=7 * 86400),
            negative_ttl=sec.integer("negative_ttl", cls.negative_ttl, maximum=86400),
        )


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: where the Prometheus endpoint listens (loopback unless configured)."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9895)

    @classmethod
    def load(cls, sec: Section) -> MetricsSettings:
        return cls(listen=sec.parse("listen", cls.listen,
                                    "HOST:PORT with an IP address (empty disables)", parse_listen))


@dataclass(frozen=True)
class PolicySettings:
    """[policy]: the chain and the replies used when a check does not name its own."""

    checks: tuple[str, ...] = ()
    on_error: Action = Action.TEMPFAIL
    error_reply: Reply = Reply(451, "4.7.0", "Temporary failure in message checks, try again later")
    reject_reply: Reply = Reply(550, "5.7.1", "Message refused by policy")
    tempfail_reply: Reply = Reply(451, "4.7.1", "Try again later")


@dataclass(frozen=True, slots=True)
class Link:
    """One check in the chain: its module and its parsed settings."""

    name: str
    module: Any
    settings: Any
    mode: Mode
    on_error: Action


ERROR_ACTIONS = (Action.TEMPFAIL, Action.ACCEPT, Action.REJECT)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. `chain` holds the enabled checks in `[policy] checks` order."""

    path: str
    milter: MilterSettings
    dns: DnsSettings
    metrics: MetricsSettings
    policy: PolicySettings
    chain: tuple[Link, ...]
    warnings: tuple[str, ...] = field(default=())


def load(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError naming what is wrong."""
    path = str(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    return from_parser(path, parser)


def loads(text: str, path: str = "<string>") -> Config:
    """Like `load`, from text (tests, `scan` defaults)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    return from_parser(path, parser)


def _check_order(psec: Section, order: tuple[str, ...], known: Mapping[str, Any]) -> None:
    """The chain's order rules: known names, once each, and each check after its inputs."""
    for name in order:
        if name not in known:
            raise psec.error("checks", f"check names from {', '.join(known)}", name)
    if len(set(order)) != len(order):
        raise psec.error("checks", "each check named once", ", ".join(order))
    if "dmarc" in order and not {"spf", "dkim"} <= set(order[:order.index("dmarc")]):
        raise psec.error("checks", "spf and dkim before dmarc, which uses their results",
                         ", ".join(order))
    if "dkim_sign" in order and any(c in order[order.index("dkim_sign"):]
                                    for c in ("bcc", "trace")):
        raise psec.error("checks", "bcc and trace before dkim_sign, so the signature covers "
                         "what they change", ", ".join(order))
    if "authres" in order and order[-1] != "authres":
        raise psec.error("checks", "authres last, so it reports every other check",
                         ", ".join(order))


def from_parser(path: str, parser: configparser.ConfigParser) -> Config:
    from mailward.checks import CHECKS  # the registry imports config types, not the reverse

    sections = {name: Section(path, name, parser[name]) for name in parser.sections()}
    known = {"milter", "dns", "metrics", "policy"} | {f"check.{n}" for n in CHECKS}
    for name in sections:
        if name not in known:
            raise ConfigError(f"{path}: [{name}]: unknown section; expected one of "
                              f"{', '.join(sorted(known))}")

    def section(name: str) -> Section:
        return sections.get(name) or Section(path, name, {})

    milter = MilterSettings.load(section("milter"))
    dns = DnsSettings.load(section("dns"))
    metrics = MetricsSettings.load(section("metrics"))
    psec = section("policy")
    order = psec.words("checks", ("tls", "sender", "ratelimit", "spf", "dkim", "dmarc", "bcc",
                                  "trace", "dkim_sign", "authres"))
    _check_order(psec, order, CHECKS)
    policy = PolicySettings(
        checks=order,
        on_error=psec.choice("on_error", Action, Action.TEMPFAIL, ERROR_ACTIONS),
        error_reply=psec.reply("error_reply", str(PolicySettings.error_reply), temporary=True),
        reject_reply=psec.reply("reject_reply", str(PolicySettings.reject_reply),
                                temporary=False),
        tempfail_reply=psec.reply("tempfail_reply", str(PolicySettings.tempfail_reply),
                                  temporary=True),
    )
    warnings = []
    chain = []
    for name, module in CHECKS.items():
        sec = section(f"check.{name}")
        enabled = sec.boolean("enabled", True)
        mode = sec.choice("mode", Mode, milter.mode)
        if milter.mode is Mode.MONITOR:
            mode = Mode.MONITOR  # global monitor wins: nothing is enforced
        on_error = sec.choice("on_error", Action, policy.on_error, ERROR_ACTIONS)
        settings = module.Settings.load(sec)
        sec.finish()
        if f"check.{name}" in sections and name not in order:
            warnings.append(f"[check.{name}] is configured but not in [policy] checks")
        if enabled and name in order:
            chain.append(Link(name, module, settings, mode, on_error))
    for s in (section("milter"), section("dns"), section("metrics"), psec):
        s.finish()
    if "sender" in order and not milter.local_domains:
        warnings.append("[milter] local_domains is empty: the sender check's relay guard and "
                        "own-domain rule are off")
    chain.sort(key=lambda link: order.index(link.name))
    return Config(path, milter, dns, metrics, policy, tuple(chain), tuple(warnings))


def describe(config: Config) -> str:
    """The effective configuration as INI text (for `mailward check-config`)."""

    def fmt(value: object) -> str:
        if isinstance(value, tuple):
            if len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
                host = f"[{value[0]}]" if ":" in value[0] else value[0]
                return f"{host}:{value[1]}"  # an address with its port
            return ", ".join(fmt(v) for v in value)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, enum.Enum):
            return str(value.value)
        return str(value)

    def block(title: str, obj: object, extra: Mapping[str, object] = MappingProxyType({})) -> str:
        lines = [f"[{title}]"]
        lines += [f"{k} = {fmt(v)}" for k, v in extra.items()]
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            if f.repr:  # fields with repr=False are derived (e.g. a loaded suffix list)
                lines.append(f"{f.name} = {fmt(getattr(obj, f.name))}")
        return "\n".join(lines)

    parts = [block("milter", config.milter), block("dns", config.dns),
             block("metrics", config.metrics),
             block("policy", config.policy)]
    for link in config.chain:
        parts.append(block(f"check.{link.name}", link.settings,
                           {"enabled": True, "mode": link.mode, "on_error": link.on_error}))
    return "\n\n".join(parts) + "\n"
