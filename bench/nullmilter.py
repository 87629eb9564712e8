"""The floor for a Python milter: pymilter with mailward's callbacks and no policy at all.

    .venv/bin/python bench/nullmilter.py unix:/path/null.sock

It negotiates what mailward negotiates (the same callbacks, the same `noreply` ones, leading
space in header values, the actions ADDHDRS | CHGHDRS | QUARANTINE), so Postfix sends it the
same milter traffic: connect, HELO, MAIL, RCPT, every header and body chunk, end of message.
It keeps the header fields in a list, counts the body bytes and adds one header field at end
of message. What mailward costs beyond this is its own work (checks, DNS, logging).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import Milter

F = TypeVar("F", bound=Callable[..., Any])

CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
noreply: Callable[[F], F] = Milter.noreply
FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE


@Milter.header_leading_space
class NullMilter(Milter.Base):  # type: ignore[misc]
    """One instance per MTA connection, like mailward's."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.size = 0

    @noreply
    def connect(self, hostname: str, family: Any, hostaddr: Any) -> int:
        return CONTINUE

    @noreply
    def hello(self, helo: str) -> int:
        return CONTINUE

    def envfrom(self, mail_from: str, *params: str) -> int:
        self.headers, self.size = [], 0
        return CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        return CONTINUE

    @noreply
    def header(self, name: str, value: str) -> int:
        self.headers.append((name, value))
        return CONTINUE

    @noreply
    def body(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return CONTINUE

    def eom(self) -> int:
        lead = " " if self._protocol & Milter.P_HDR_LEADSPC else ""
        self.addheader("X-Null-Milter", f"{lead}{len(self.headers)} fields, {self.size} bytes")
        return ACCEPT  # as mailward does after its edits

    def abort(self) -> int:
        self.headers, self.size = [], 0
        return CONTINUE

    def close(self) -> int:
        return CONTINUE


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    Milter.factory = NullMilter
    Milter.set_flags(FLAGS)
    Milter.runmilter("nullmilter", sys.argv[1], timeout=600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
