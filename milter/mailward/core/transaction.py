"""The transaction: everything the MTA told us about one message, as frozen data.

The adapter builds a new `Transaction` at each protocol stage; checks only read it.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stage(enum.IntEnum):
    """Protocol stages where a check may decide, in SMTP order."""

    CONNECT = 1
    HELO = 2
    MAIL = 3
    RCPT = 4
    EOM = 5


class Direction(enum.StrEnum):
    """Which way the message crosses our trust boundary.

    inbound: from the Internet. outbound: authenticated, from `trusted_networks` or on an
    originating service, to at least one non-local recipient. internal: from us to local
    recipients only (needs `local_domains`).
    """

    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Tls:
    """The TLS session, from the MTA's `{tls_version}`, `{cipher}` and `{cipher_bits}`."""

    version: str
    cipher: str = ""
    bits: str = ""


@dataclass(frozen=True, slots=True)
class Header:
    """One header field as the MTA handed it over.

    `value` is byte-exact when the MTA honoured SMFIP_HDR_LEADSPC (leading white space kept,
    folds as `\\n` plus white space); undecodable bytes are kept as surrogate escapes.
    `index` is the 1-based position among fields of the same name (case-insensitive): the
    index `smfi_chgheader` expects.
    """

    name: str
    value: str
    index: int

    @property
    def stripped(self) -> str:
        """The value unfolded, without surrounding white space."""
        return " ".join(self.value.split())


class Body:
    """The message body, spooled to a temporary file in `directory` (default: the system's
    temporary directory) once it outgrows `threshold` bytes.

    A write that fails (a full disk: ENOSPC) raises `OSError` from `write`, never later: once
    on disk every chunk is flushed, so no byte waits in a buffer and a body is never read
    back shorter than it was written.
    """

    def __init__(self, *, threshold: int, directory: str | None = None) -> None:
        self._file: BinaryIO = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]
            max_size=threshold, dir=directory or None)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        if self.on_disk:
            self._file.flush()
        self.size += len(chunk)

    @property
    def on_disk(self) -> bool:
        return bool(getattr(self._file, "_rolled", False))

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """Yield the body from its start."""
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def close(self) -> None:
        # after a failed write the buffer's flush fails again; the file is closed (and, being
        # unlinked already, gone) all the same
        with contextlib.suppress(OSError):
            self._file.close()


@dataclass(frozen=True, slots=True)
class Transaction:
    """What is known about the message at `stage`.

    At `Stage.RCPT`, `recipients[-1]` is the recipient being judged; at `Stage.EOM`,
    `recipients` holds every accepted recipient.
    """

    stage: Stage
    client_ip: IPAddress | None = None
    client_name: str = ""
    helo: str = ""
    tls: Tls | None = None
    auth_user: str = ""
    auth_type: str = ""
    daemon_name: str = ""
    queue_id: str = ""
    mail_from: str = ""
    mail_params: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    headers: tuple[Header, ...] = ()
    body: Body | None = field(default=None, compare=False)
    direction: Direction = Direction.INBOUND

    def get_all(self, name: str) -> tuple[Header, ...]:
        """All header fields called `name` (case-insensitive), in message order."""
        lname = name.lower()
        return tuple(h for h in self.headers if h.name.lower() == lname)


def strip_brackets(address: str) -> str:
    """`<a@b>` → `a@b`; the null sender `<>` → `""`."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased; `""` when there is none."""
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at else ""


def index_headers(pairs: list[tuple[str, str]]) -> tuple[Header, ...]:
    """Number (name, value) pairs with their per-name index, as milters count them."""
    seen: dict[str, int] = {}
    out = []
    for name, value in pairs:
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        out.append(Header(name, value, seen[key]))
    return tuple(out)


def render_message(headers: Iterable[tuple[str, str]], body: Body | None) -> bytes:
    """The message on the wire: fields as received (folds as CRLF), blank line, body."""
    head = b"".join(
        name.encode("ascii", "surrogateescape") + b":"
        + value.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")
        + b"\r\n" for name, value in headers)
    return head + b"\r\n" + (b"".join(body.chunks()) if body is not None else b"")
