"""What a check gets besides the transaction: site settings and the results before it."""

from __future__ import annotations

from dataclasses import dataclass

from mailward.config import MilterSettings
from mailward.counters import Counters
from mailward.dns import Resolver
from mailward.verdict import CheckResult


@dataclass(frozen=True, slots=True)
class Deps:
    """Shared, read-only services for checks.

    `results` holds the results of the checks earlier in the chain at this stage, so that a
    check such as `authres` (or DMARC) reports or uses them without redoing their work.
    """

    site: MilterSettings
    dns: Resolver | None = None
    counters: Counters | None = None
    results: tuple[CheckResult, ...] = ()
