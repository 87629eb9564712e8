"""Netstrings (`12:hello world!,`), the framing of Postfix's socketmap protocol. Pure."""

from __future__ import annotations


class NetstringError(ValueError):
    """Bytes that are no netstring, or one longer than the reader allows."""


def encode(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def decode(buffer: bytes, limit: int) -> tuple[bytes, bytes] | None:
    """The first netstring of `buffer` and the bytes after it, or None when more bytes are
    needed. A length over `limit`, or anything but digits, `:` and `,` where they belong,
    is a NetstringError: the peer is not speaking the protocol, and the connection ends."""
    colon = buffer.find(b":", 0, len(str(limit)) + 1)
    if colon < 0:
        if len(buffer) > len(str(limit)) or (buffer and not buffer.isdigit()):
            raise NetstringError("no length prefix")
        return None
    digits = buffer[:colon]
    if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")):
        raise NetstringError("bad length prefix")
    length = int(digits)
    if length > limit:
        raise NetstringError(f"netstring of {length} bytes, more than {limit}")
    end = colon + 1 + length
    if len(buffer) <= end:
        return None
    if buffer[end:end + 1] != b",":
        raise NetstringError("netstring not closed by ','")
    return buffer[colon + 1:end], buffer[end + 1:]
