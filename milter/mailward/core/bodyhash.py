"""DKIM body hashes (RFC 6376 §3.4.3, §3.4.4, §3.7), streamed: linear time, bounded memory.

The body is fed in chunks, as it comes off the spool; nothing but a few held-back bytes and
a count of trailing empty lines is kept between chunks, so a 50 MB body costs one chunk of
memory. Every step is a C-level bytes operation (dkimpy's
`[\\t ]+\\r\\n` substitution is quadratic in a long run of white space that does not end a
line: 40 KB of spaces cost it 1.4 s). Runs of white space shrink by halving replacements (at
most log2 of the chunk size passes), trailing line ends are counted with one rstrip: every
input, hostile or not, costs a few C scans per byte.

The result equals dkimpy's `CanonicalizationPolicy.canonicalize_body` byte for byte (the
tests compare them), including its reading of the edge cases: relaxed keeps one SP before the
CRLF it adds to a last line without one, and an empty relaxed body hashes as empty.
"""

from __future__ import annotations

import hashlib

_CRLF_BLOCK = 32768


def _trailing_pairs(tail: bytes) -> int:
    """How many CRLFs end `tail`, a string of CR and LF only. After the last doubled
    character (CR CR or LF LF) the characters alternate, so the count is arithmetic."""
    if not tail.endswith(b"\n"):
        return 0
    run = tail[max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1:]
    return (len(run) - run.startswith(b"\n")) // 2


class BodyHash:
    """One body hash: canonicalization (`relaxed` or simple), hash function, optional l=."""

    def __init__(self, *, relaxed: bool, hash_name: str, limit: int | None = None) -> None:
        self.relaxed = relaxed
        self.limit = limit
        self.length = 0  # bytes of the whole canonical body (l= is judged against it)
        self._hash = hashlib.new(hash_name)
        self._hashed = 0
        self._carry = b""  # a trailing CR (of a CRLF to come) and, relaxed, a pending SP
        self._crlfs = 0  # trailing CRLFs held back: dropped if nothing follows them
        self._done = False

    def _out(self, data: bytes) -> None:
        self.length += len(data)
        if self.limit is None:
            self._hash.update(data)
        elif self._hashed < self.limit:
            part = data[:self.limit - self._hashed]
            self._hash.update(part)
            self._hashed += len(part)

    def _flush_crlfs(self) -> None:
        while self._crlfs:
            n = min(self._crlfs, _CRLF_BLOCK)
            self._out(b"\r\n" * n)
            self._crlfs -= n

    def update(self, chunk: bytes) -> None:
        """Feed the next piece of the body (as received: lines end in CRLF)."""
        data = self._carry + chunk
        if self.relaxed and (b" " in data or b"\t" in data):  # §3.4.4 (base64 has neither)
            data = data.replace(b"\t", b" ")
            while b"  " in data:  # each pass halves every run: log2(chunk size) passes at most
                data = data.replace(b"  ", b" ")
            data = data.replace(b" \r\n", b"\r\n")
        hold = 1 if data.endswith(b"\r") else 0
        if self.relaxed and data.endswith(b" ", 0, len(data) - hold):
            hold += 1
        self._carry = data[len(data) - hold:] if hold else b""
        if hold:
            data = data[:len(data) - hold]
        core = len(data.rstrip(b"\r\n"))
        pairs = _trailing_pairs(data[core:])
        end = len(data) - 2 * pairs
        if end:
            self._flush_crlfs()
            self._out(data if end == len(data) else data[:end])
        self._crlfs += pairs

    def digest(self) -> bytes:
        """The hash of the canonical body (§3.7), after the last `update`."""
        if not self._done:
            self._done = True
            emitted = self.length > 0 or self._crlfs > 0
            if self._carry:  # a lone CR or a last line's SP: content (as dkimpy reads it)
                self._flush_crlfs()
                self._out(self._carry)
                self._out(b"\r\n")
            elif emitted and (self.length > 0 or not self.relaxed):
                self._out(b"\r\n")  # one line end kept, or added (§3.4.3, §3.4.4)
            elif not self.relaxed:
                self._out(b"\r\n")  # an empty simple body is one CRLF (§3.4.3)
            self._crlfs = 0
        return self._hash.digest()
