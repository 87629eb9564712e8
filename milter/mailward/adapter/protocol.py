"""The milter protocol's frames, as bytes in and out: pure, no I/O (the asyncio engine's codec).

A packet (libmilter's mfdef.h) is a 4-byte big-endian length, then a command byte and its
data; the length counts the command byte. Strings are NUL-terminated. What the MTA sends:
OPTNEG `O` (version, actions, protocol steps: three 32-bit words), MACRO `D` (the command the
macros belong to, then name/value pairs), CONNECT `C` (host name, family `4`/`6`/`L`/`U`, for
4 and 6 a 16-bit port, then the address), HELO `H`, MAIL `M` and RCPT `R` (address, then ESMTP
arguments), DATA `T`, HEADER `L` (name, value), EOH `N`, BODY `B` (raw bytes), end of body
`E` (a last chunk, usually empty), ABORT `A`, QUIT `Q`, QUIT_NC `K` (quit, but a new
connection follows on this socket), UNKNOWN `U`.

Every parser here takes bytes a peer wrote and either returns a value or raises
`ProtocolError`; none allocates more than its input (a packet is bounded by `Reader`'s
`limit`). The MTA is trusted only as far as its socket's permissions let it be (adapter/
milter.py `restrict`), so a malformed frame ends that connection, never the milter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# commands from the MTA
OPTNEG, MACRO, CONNECT, HELO, MAIL, RCPT = b"O", b"D", b"C", b"H", b"M", b"R"
DATA, HEADER, EOH, BODY, BODYEOB = b"T", b"L", b"N", b"B", b"E"
ABORT, QUIT, QUIT_NC, UNKNOWN = b"A", b"Q", b"K", b"U"

# replies and edits to the MTA
CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD = b"c", b"a", b"r", b"t", b"d"
REPLYCODE, ADDHEADER, INSHEADER, CHGHEADER, QUARANTINE = b"y", b"h", b"i", b"m", b"q"

# protocol version and the actions (SMFIF_*) we may ask for
VERSION = 6
ADDHDRS, CHGHDRS, QUARANTINE_ACTION = 0x01, 0x10, 0x20

# Steps (SMFIP_*) whose reply the milter may waive ("no reply"), by command.
NOREPLY_BIT = {CONNECT: 0x1000, HELO: 0x2000, MAIL: 0x4000, RCPT: 0x8000, DATA: 0x10000,
               UNKNOWN: 0x20000, EOH: 0x40000, BODY: 0x80000, HEADER: 0x80}
HDR_LEADSPC = 0x100000

# Packets larger than this end the connection. We never ask for SMFIP_MDS_256K/1M, so the
# MTA sends body chunks of at most 64 KiB; a header field can be longer (Postfix's
# header_size_limit is 100 KiB by default): 1 MiB leaves room for any MTA's setting.
MAX_PACKET = 1024 * 1024

# Strings in one packet (MACRO names and values, MAIL or RCPT arguments). Postfix and Sendmail
# send a few dozen at most (an SMTP command line is at most 2048 bytes); a 1 MiB packet of
# short strings would be ~350,000 Python objects, some 35 MB kept for the connection's life.
MAX_STRINGS = 1024

# SMTP reply texts as libmilter checks them (smfi_setreply): no CR or LF, at most 980 bytes
MAX_REPLY_TEXT = 980


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


class Reader:
    """Splits a byte stream into (command, data) packets, refusing any over `limit`."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._buf = bytearray()  # appended to in place: a packet arriving in many small
        # pieces must not cost a copy of all that came before for each piece

    @property
    def pending(self) -> int:
        """Bytes received and not yet part of a whole packet."""
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> list[tuple[bytes, bytes]]:
        """The whole packets `data` completes, in order; the rest waits for more. Nothing
        refers to `data` once this returns (what is kept is copied)."""
        pieces = bool(self._buf)
        if pieces:  # a packet in pieces: kept in place, each piece appended once
            self._buf += data
            view = memoryview(self._buf)
        else:  # the usual case: whole packets, each copied out of `data` once
            view = memoryview(data)
        out: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(view)
        try:
            while end - pos >= 4:
                (length,) = struct.unpack_from(">I", view, pos)
                if length == 0:
                    raise ProtocolError("a packet without a command")
                if length > self.limit:
                    raise ProtocolError(f"a packet of {length} bytes (at most {self.limit})")
                if end - pos - 4 < length:
                    break
                out.append((bytes(view[pos + 4:pos + 5]), bytes(view[pos + 5:pos + 4 + length])))
                pos += 4 + length
            rest = b"" if pieces else view[pos:].tobytes()
        finally:
            view.release()
        if pieces:
            del self._buf[:pos]
        else:
            self._buf += rest
        return out


def text(raw: bytes) -> str:
    """Bytes as pymilter gives them to callbacks: UTF-8, other bytes as surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def _check_strings(data: bytes) -> None:
    """NUL-terminated strings, at most MAX_STRINGS of them (checked, not split)."""
    if not data.endswith(b"\0"):
        raise ProtocolError("a string without its terminating NUL")
    count = data.count(b"\0")
    if count > MAX_STRINGS:
        raise ProtocolError(f"{count} strings in a packet (at most {MAX_STRINGS})")


def strings(data: bytes, *, at_least: int = 1) -> list[str]:
    """NUL-terminated strings; the data must end with a NUL."""
    _check_strings(data)
    words = data[:-1].split(b"\0")
    if len(words) < at_least:
        raise ProtocolError(f"{len(words)} string(s), at least {at_least} expected")
    return [text(w) for w in words]


@dataclass(frozen=True, slots=True)
class Options:
    """OPTNEG: the protocol version, actions and steps the MTA offers."""

    version: int
    actions: int
    steps: int


def options(data: bytes) -> Options:
    if len(data) < 12:
        raise ProtocolError(f"OPTNEG of {len(data)} bytes")
    version, actions, steps = struct.unpack_from(">III", data)
    if version < 2:
        raise ProtocolError(f"milter protocol version {version}")
    return Options(version, actions, steps)


def macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """MACRO: the command they belong to and the name → value pairs (an odd one is dropped,
    as libmilter does)."""
    command, raw = macro_block(data)
    return command, macro_pairs(raw)


def macro_block(data: bytes) -> tuple[bytes, bytes]:
    """MACRO checked but not decoded: the command, and the pairs as sent (`macro_pairs`).
    The MTA sends several per message; most are never read."""
    if not data:
        raise ProtocolError("MACRO without a command")
    if len(data) > 1:
        _check_strings(data[1:])
    return data[:1], data[1:]


def macro_pairs(raw: bytes) -> dict[str, str]:
    words = strings(raw, at_least=0) if raw else []
    return dict(zip(words[0::2], words[1::2], strict=False))


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT: the client's name, family and address as pymilter passes them on."""

    hostname: str
    family: str
    hostaddr: tuple[str, int] | str | None


def connect(data: bytes) -> Connect:
    name, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ProtocolError("CONNECT without a family")
    family = chr(rest[0])
    if family in "46":
        if len(rest) < 4 or not rest.endswith(b"\0"):
            raise ProtocolError("CONNECT without port and address")
        (port,) = struct.unpack_from(">H", rest, 1)
        return Connect(text(name), family, (text(rest[3:-1]), port))
    if family == "L":  # a unix socket: its path, which we do not use
        return Connect(text(name), family, text(rest[1:].rstrip(b"\0")))
    return Connect(text(name), family, None)  # "U": unknown


def header(data: bytes) -> tuple[str, str]:
    words = strings(data, at_least=2)
    if len(words) != 2:
        raise ProtocolError(f"HEADER of {len(words)} strings")
    return words[0], words[1]


# -- what we send -----------------------------------------------------------------------------

def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def cstring(value: str) -> bytes:
    """`value` as a NUL-terminated string; one with a NUL in it cannot be sent."""
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError("a NUL byte in a milter string")
    return raw + b"\0"


def negotiate(version: int, actions: int, steps: int) -> bytes:
    return packet(OPTNEG, struct.pack(">III", version, actions, steps))


def reply(code: str, xcode: str | None, message: str | None) -> bytes:
    """REPLYCODE as smfi_setreply builds it, with its checks: a 4xx or 5xx code, an enhanced
    status code, a text without CR or LF of at most 980 bytes (`%` doubled by the caller,
    as for libmilter: Postfix and Sendmail read the text as a format)."""
    if len(code) != 3 or code[0] not in "45" or not code[1:].isdigit() or not code.isascii():
        raise ValueError(f"SMTP reply code {code!r}")
    parts = [code]
    if xcode is not None:
        if not _enhanced(xcode):
            raise ValueError(f"enhanced status code {xcode!r}")
        parts.append(xcode)
    if message is not None:
        if "\r" in message or "\n" in message or len(message.encode()) > MAX_REPLY_TEXT:
            raise ValueError("a reply text with CR or LF, or over 980 bytes")
        parts.append(message)
    return packet(REPLYCODE, cstring(" ".join(parts)))


def _enhanced(xcode: str) -> bool:
    klass, _, rest = xcode.partition(".")
    subject, _, detail = rest.partition(".")
    return (klass in ("2", "4", "5")
            and all(part.isascii() and part.isdigit() and len(part) <= 3
                    for part in (subject, detail)))


def add_header(name: str, value: str, index: int = -1) -> bytes:
    if index < 0:
        return packet(ADDHEADER, cstring(name) + cstring(value))
    return packet(INSHEADER, struct.pack(">I", index) + cstring(name) + cstring(value))


def change_header(name: str, index: int, value: str) -> bytes:
    """CHGHEADER; an empty value deletes the `index`th field called `name`."""
    return packet(CHGHEADER, struct.pack(">I", index) + cstring(name) + cstring(value))


def quarantine(reason: str) -> bytes:
    return packet(QUARANTINE, cstring(reason))
