"""bcc: no `Bcc:` (or `Resent-Bcc:`) field may travel with the message.

A client that leaves Bcc in the header discloses blind recipients to every recipient
(RFC 5322 §3.6.3 lets the sending agent strip it; many do not). Postfix's cleanup drops it by
default (`message_drop_headers`); Sendmail and a Postfix with that setting emptied do not.

Results: none = no such field; pass = the fields were found and are deleted (every one, by
its own index, highest first, so earlier deletions do not shift later ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailward.core.check import Context, ModuleCheck
from mailward.core.ini import Section
from mailward.core.transaction import Stage, Transaction
from mailward.core.verdict import CheckResult, DeleteHeader, Result

NAME = "bcc"


@dataclass(frozen=True)
class Settings:
    """[check.bcc]"""

    headers: tuple[str, ...] = ("Bcc", "Resent-Bcc")

    @classmethod
    def load(cls, sec: Section) -> Settings:
        return cls(headers=sec.words("headers", cls.headers))


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Delete every field named in `settings.headers`."""
    wanted = {h.lower() for h in settings.headers}
    found = [h for h in tx.headers if h.name.lower() in wanted]
    if not found:
        return CheckResult(NAME, Result.NONE)
    edits = tuple(DeleteHeader(h.name, h.index)
                  for h in sorted(found, key=lambda h: (h.name.lower(), -h.index)))
    names = sorted({h.name for h in found})
    return CheckResult(NAME, Result.PASS, edits=edits,
                       reason=f"removed {len(found)} field(s): {', '.join(names)}")


class Bcc(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.EOM})


CHECK = Bcc(Settings.load, check)
