"""The core sections of the configuration: [milter], [metrics] and [policy]'s replies.

Each is a frozen dataclass with a `load(section)` that reads and validates its keys. Check
settings live with their checks; [dns] lives with the resolver (services/dns.py).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

from mailward.core.ini import DOMAIN_RE, IPNetwork, Section
from mailward.core.verdict import Action, Quarantine, Reply
from mailward.services.dns import parse_nameserver


class Mode(enum.StrEnum):
    """enforce: act on results. monitor: accept, but log and tag what would have happened."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


ERROR_ACTIONS = (Action.TEMPFAIL, Action.ACCEPT, Action.REJECT)


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
            if not DOMAIN_RE.fullmatch(host):
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


def is_tcp(spec: str) -> bool:
    """Whether a (valid) libmilter socket spec is a TCP socket rather than a unix one."""
    return spec.startswith(("inet:", "inet6:"))


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is on loopback; other names count as not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- sections ---------------------------------------------------------------------------------

ENGINES = ("asyncio", "libmilter")  # [milter] engine: adapter/aio.py, adapter/milter.py

# The smallest [milter] spool_threshold: 0 would mean "never spool" (SpooledTemporaryFile's
# max_size=0 never rolls over), so a body of any size would stay in memory.
MIN_SPOOL_THRESHOLD = 1024


@dataclass(frozen=True)
class MilterSettings:
    """[milter]: how we talk to the MTA and what we consider ours.

    Secure by default: a unix socket that only the MTA's group may use (see adapter/milter.py
    `serve`), and no trusted network, so mail is outbound only when SASL-authenticated or on
    an originating service; trusting a network (and every local user, for loopback) is an
    explicit choice.
    """

    socket: str = "unix:/var/spool/postfix/mailward/milter.sock"
    engine: str = "asyncio"  # or libmilter (adapter/aio.py, adapter/milter.py)
    timeout: float = 60.0
    stop_grace: float = 30.0
    authserv_id: str = ""
    mode: Mode = Mode.ENFORCE
    trusted_networks: tuple[IPNetwork, ...] = ()
    originating_daemons: tuple[str, ...] = ("ORIGINATING",)
    local_domains: tuple[str, ...] = ()
    spool_threshold: int = 1024 * 1024
    max_header_fields: int = 10_000
    spool_dir: str = ""  # empty: the system's temporary directory (tempfile.gettempdir())
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
            engine=sec.option("engine", cls.engine, ENGINES),
            timeout=sec.seconds("timeout", cls.timeout, maximum=3600),
            stop_grace=sec.seconds("stop_grace", cls.stop_grace, maximum=3600),
            authserv_id=authserv_id,
            mode=sec.choice("mode", Mode, Mode.ENFORCE),
            trusted_networks=sec.networks("trusted_networks", ()),
            originating_daemons=sec.words("originating_daemons", cls.originating_daemons),
            local_domains=sec.domains("local_domains"),
            spool_threshold=_spool_threshold(sec),
            max_header_fields=sec.integer("max_header_fields", cls.max_header_fields,
                                          minimum=100, maximum=100_000),
            spool_dir=sec.parse("spool_dir", "", "an absolute path to an existing directory "
                                "we may write to (empty: the system's temporary directory)",
                                _spool_dir),
            log_level=sec.parse("log_level", "info", "one of debug, info, warning, error",
                                _log_level),
        )


def _spool_threshold(sec: Section) -> int:
    value = sec.size("spool_threshold", MilterSettings.spool_threshold)
    if value < MIN_SPOOL_THRESHOLD:
        raise sec.error("spool_threshold", "a size of at least 1K: bodies larger than it are "
                        "spooled to disk, and 0 would keep every body in memory",
                        f"{value} bytes")
    return value


def _spool_dir(raw: str) -> str:
    # checked when the config is loaded (and on reload), so a bad directory never starts
    # and no message has to find out
    if raw and not (os.path.isabs(raw) and os.path.isdir(raw)
                    and os.access(raw, os.W_OK | os.X_OK)):
        raise ValueError(raw)
    return raw


def _hostname(raw: str) -> str:
    if not DOMAIN_RE.fullmatch(raw):
        raise ValueError(raw)
    return raw.rstrip(".").lower()


def _log_level(raw: str) -> str:
    if raw.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(raw)
    return raw.lower()


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: where the Prometheus endpoint listens (loopback unless configured)."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9895)

    @classmethod
    def load(cls, sec: Section) -> MetricsSettings:
        return cls(listen=sec.parse("listen", cls.listen,
                                    "HOST:PORT with an IP address (empty disables)", parse_listen))


def parse_sts_listen(spec: str) -> str:
    """Where `mailward sts` listens: `unix:/absolute/path` or `inet:HOST:PORT` (an address)."""
    kind, sep, rest = spec.partition(":")
    if kind == "unix" and sep and rest.startswith("/") and "\0" not in rest:
        return spec
    if kind == "inet" and sep and parse_listen(rest) is not None:
        return spec
    raise ValueError(spec)


def parse_url(spec: str) -> str:
    if spec and not spec.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(spec)
    return spec


def parse_resolver(spec: str) -> tuple[str, int] | None:
    """`IP` or `IP:PORT` (`[V6]:PORT`), as [dns] nameservers takes them; empty disables."""
    return parse_nameserver(spec) if spec else None


class StsCache(enum.StrEnum):
    SQLITE = "sqlite"
    REDIS = "redis"


@dataclass(frozen=True)
class StsSettings:
    """[sts]: the MTA-STS policy service for Postfix's SMTP client (`mailward sts run`).

    Postfix asks it through `smtp_tls_policy_maps = socketmap:...:postfix`. Loopback TCP by
    default, because Debian runs Postfix's smtp(8) chrooted, where a unix socket in /run is
    out of reach; what it tells is public (a domain's published policy)."""

    listen: str = "inet:127.0.0.1:8461"
    map_name: str = "postfix"
    cache: StsCache = StsCache.SQLITE
    cache_path: str = "/var/lib/mailward/sts.sqlite"
    redis_url: str = ""
    ca_file: str = ""
    https_port: int = 443
    fetch_timeout: float = 10.0
    max_policy_size: int = 64 * 1024
    refresh_interval: float = 3600.0
    dane_resolver: tuple[str, int] | None = None
    allow_private_addresses: bool = False
    metrics: tuple[str, int] | None = ("127.0.0.1", 9896)
    log_level: str = "info"

    @classmethod
    def load(cls, sec: Section) -> StsSettings:
        cache = sec.choice("cache", StsCache, cls.cache)
        redis_url = sec.parse("redis_url", "", "redis://HOST:PORT/DB, rediss://... or "
                              "unix:///path (empty: none)", parse_url)
        if cache is StsCache.REDIS and not redis_url:
            raise sec.error("redis_url", "a Redis URL when cache = redis", "")
        return cls(
            listen=sec.parse("listen", cls.listen, "inet:ADDRESS:PORT or unix:/absolute/path",
                             parse_sts_listen),
            map_name=sec.parse("map_name", cls.map_name, "the socketmap name Postfix sends "
                               "(letters, digits, _ and -)", _map_name),
            cache=cache,
            cache_path=sec.parse("cache_path", cls.cache_path, "an absolute path", _abs_path),
            redis_url=redis_url,
            ca_file=sec.parse("ca_file", "", "a readable PEM file of trusted CAs, added to "
                              "the system's (empty: the system's only)", _readable),
            https_port=sec.integer("https_port", cls.https_port, minimum=1, maximum=65535),
            fetch_timeout=sec.seconds("fetch_timeout", cls.fetch_timeout, maximum=120),
            max_policy_size=sec.size("max_policy_size", cls.max_policy_size),
            refresh_interval=sec.seconds("refresh_interval", cls.refresh_interval,
                                         maximum=7 * 86400),
            dane_resolver=sec.parse("dane_resolver", None, "IP or IP:PORT of a DNSSEC-"
                                    "validating resolver (empty: DANE is not looked at)",
                                    parse_resolver),
            allow_private_addresses=sec.boolean("allow_private_addresses",
                                                cls.allow_private_addresses),
            metrics=sec.parse("metrics", cls.metrics,
                              "HOST:PORT with an IP address (empty disables)", parse_listen),
            log_level=sec.parse("log_level", "info", "one of debug, info, warning, error",
                                _log_level),
        )


def _map_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", raw):
        raise ValueError(raw)
    return raw


def _abs_path(raw: str) -> str:
    if not os.path.isabs(raw) or "\0" in raw:
        raise ValueError(raw)
    return raw


def _readable(raw: str) -> str:
    if raw and not (os.path.isabs(raw) and os.access(raw, os.R_OK)):
        raise ValueError(raw)
    return raw


_MAILBOX = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}")


def parse_mailbox(raw: str) -> str:
    """A plain address (local@domain) we write into header fields: no display name, no
    characters that could start another field or parameter."""
    if raw and not (_MAILBOX.fullmatch(raw) and DOMAIN_RE.fullmatch(raw.rpartition("@")[2])):
        raise ValueError(raw)
    return raw.lower() if raw else raw


def parse_mailboxes(raw: str) -> tuple[str, ...]:
    return tuple(parse_mailbox(w) for w in re.split(r"[\s,]+", raw) if w)


class ReportStoreKind(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"
    OFF = "off"


class RelayTls(enum.StrEnum):
    REQUIRE = "require"
    MAY = "may"
    NO = "no"


@dataclass(frozen=True)
class ReportsSettings:
    """[reports]: DMARC aggregate reports (RFC 9990), sent for the domains we judge and read
    for our own. The milter records outcomes and takes in reports; `mailward reports` builds,
    sends, ingests files and shows."""

    store: ReportStoreKind = ReportStoreKind.SQLITE
    sqlite_path: str = "/var/lib/mailward/reports.sqlite"
    postgresql_url: str = field(default="", repr=False)  # may hold a password
    retention: int = 90  # days
    org_name: str = ""  # empty: [milter] authserv_id
    sender: str = ""  # From of report mail; its domain must have a [check.dkim_sign] key
    contact: str = ""  # empty: the sender
    relay: tuple[str, int] = ("127.0.0.1", 25)
    relay_tls: RelayTls = RelayTls.MAY
    relay_user: str = ""
    relay_password_file: str = ""
    max_report_size: int = 10 * 1024 * 1024
    ingest_addresses: tuple[str, ...] = ()
    max_ingest_size: int = 20 * 1024 * 1024
    max_report_records: int = 100000

    @classmethod
    def load(cls, sec: Section) -> ReportsSettings:
        store = sec.choice("store", ReportStoreKind, cls.store)
        url = sec.string("postgresql_url", "")
        if store is ReportStoreKind.POSTGRESQL and not url.startswith(("postgresql://",
                                                                       "postgres://")):
            raise sec.error("postgresql_url", "postgresql://USER@HOST/DB when store = "
                            "postgresql", "(hidden)" if url else "")
        return cls(
            store=store,
            sqlite_path=sec.parse("sqlite_path", cls.sqlite_path, "an absolute path",
                                  _abs_path),
            postgresql_url=url,
            retention=sec.integer("retention", cls.retention, minimum=1, maximum=3650),
            org_name=sec.parse("org_name", "", "a host or domain name", _org_name),
            sender=sec.parse("sender", "", "an address local@domain", parse_mailbox),
            contact=sec.parse("contact", "", "an address local@domain", parse_mailbox),
            relay=sec.parse("relay", cls.relay, "HOST:PORT with an IP address",
                            _required_listen),
            relay_tls=sec.choice("relay_tls", RelayTls, cls.relay_tls),
            relay_user=sec.string("relay_user", ""),
            relay_password_file=sec.parse("relay_password_file", "", "a readable file",
                                          _readable),
            max_report_size=sec.size("max_report_size", cls.max_report_size),
            ingest_addresses=sec.parse("ingest_addresses", (), "addresses local@domain",
                                       parse_mailboxes),
            max_ingest_size=sec.size("max_ingest_size", cls.max_ingest_size),
            max_report_records=sec.integer("max_report_records", cls.max_report_records,
                                           minimum=1, maximum=10_000_000),
        )


def _org_name(raw: str) -> str:
    if raw and not DOMAIN_RE.fullmatch(raw):
        raise ValueError(raw)
    return raw.lower().rstrip(".")


def _required_listen(raw: str) -> tuple[str, int]:
    found = parse_listen(raw)
    if found is None:
        raise ValueError(raw)
    return found


# Fields a quarantine header must not be: mailward would delete or rewrite what the message
# and its authentication depend on.
_RESERVED_FIELDS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date", "message-id",
    "received", "return-path", "authentication-results", "dkim-signature", "arc-seal",
    "arc-message-signature", "arc-authentication-results", "mime-version", "content-type",
    "content-transfer-encoding"})
QUARANTINE_HEADER_EXPECTED = ("a header field name of letters, digits and hyphens (at most 64), "
                              "not one the message's authentication depends on")
SUBJECT_TAG_EXPECTED = "printable ASCII text of at most 32 characters, or empty"


def parse_field_name(raw: str) -> str:
    """A header field name for the quarantine tag (ValueError when unsafe)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", raw) or raw.lower() in _RESERVED_FIELDS:
        raise ValueError(raw)
    return raw


def parse_subject_tag(raw: str) -> str:
    """Text put before a tagged message's Subject, e.g. `[SPAM]`."""
    if len(raw) > 32 or not all(" " <= c <= "~" for c in raw):
        raise ValueError(raw)
    return raw


@dataclass(frozen=True)
class PolicySettings:
    """[policy]: the chain and the replies used when a check does not name its own."""

    checks: tuple[str, ...] = ()
    on_error: Action = Action.TEMPFAIL
    error_reply: Reply = Reply(451, "4.7.0", "Temporary failure in message checks, try again later")
    reject_reply: Reply = Reply(550, "5.7.1", "Message refused by policy")
    tempfail_reply: Reply = Reply(451, "4.7.1", "Try again later")
    quarantine: Quarantine = Quarantine.HOLD
    quarantine_header: str = "X-Mailward-Quarantine"
    quarantine_subject_tag: str = ""
