"""The check interface: what every check declares and implements, and what it is given.

A check is an instance of a `Check` subclass, one per check module (`CHECK`). It declares:
- `name`: its INI section is `[check.NAME]` and its name in `[policy] checks`;
- `stages`: the protocol stages where it runs (a refusal is sent at the earliest one);
- `directions`: the directions it judges; elsewhere the pipeline records `none` for it;
- `requires`: checks that must be in the chain before it (their outcomes are its inputs);
- `after`: checks that, when in the chain, must run before it (`"*"`: every other check that
  does not itself name this one in `requires` or `after`);
- `uses`: the services it is handed (`Service`);
- `safety_edits`: its header edits protect readers and are made even in monitor mode.
It implements `load(section) -> Settings` and `run(tx, ctx, settings) -> CheckResult`, and may
name the rate-limit store it needs (`rate_store`), warn about settings that are valid but likely
wrong (`config_warnings`), or check its setup against the world at start and reload
(`setup_warnings`, e.g. published DKIM keys).

The `Registry` holds the checks in their default order; the chain-order rules of the config are
derived from the declarations above, never written by check name.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from mailward.core.ini import Section
from mailward.core.settings import MilterSettings, Mode
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import Action, CheckResult, Quarantine
from mailward.services.dns import BoundResolver, Resolver
from mailward.services.metrics import Metrics
from mailward.services.ratestore import RateStore, StoreSpec

S = TypeVar("S")
T = TypeVar("T")

ALL_DIRECTIONS = frozenset(Direction)
EVERY_OTHER = "*"


class Service(enum.StrEnum):
    """Services a check may use, built with the configuration (see core/snapshot.py)."""

    DNS = "dns"  # ctx.dns: the shared resolver, bound to the message's time budget
    RATES = "rates"  # ctx.rates: the rate-limit counter store


@dataclass(frozen=True, slots=True)
class Context:
    """What a check is given besides the transaction and its settings.

    `results` are those of the checks before it at this stage, in chain order. `metrics`
    is where a check counts what only it knows (e.g. ARC overrides); None offline (scan).
    """

    site: MilterSettings
    dns: BoundResolver
    rates: RateStore
    results: tuple[CheckResult, ...] = ()
    metrics: Metrics | None = None

    def outcome(self, kind: type[T]) -> T | None:
        """The outcome of type `kind` published by an earlier check, if any."""
        for r in self.results:
            if isinstance(r.outcome, kind):
                return r.outcome
        return None


class Check(abc.ABC, Generic[S]):
    """Base class of every check (see the module docstring)."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    directions: ClassVar[frozenset[Direction]] = ALL_DIRECTIONS
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[frozenset[Service]] = frozenset()
    # header edits that protect readers (e.g. deleting forged Authentication-Results) are
    # made in monitor mode too; a monitored check's other edits are only recorded
    safety_edits: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self, sec: Section) -> S:
        """Read and validate `[check.NAME]` (a ConfigError names the key)."""

    @abc.abstractmethod
    def run(self, tx: Transaction, ctx: Context, settings: S) -> CheckResult:
        """Judge `tx` at `tx.stage`."""

    def rate_store(self, settings: S) -> StoreSpec | None:
        """The rate-limit store this check's settings ask for (only checks using RATES)."""
        return None

    def config_warnings(self, settings: S, site: MilterSettings) -> list[str]:
        """Settings that are valid but probably not what the administrator meant."""
        return []

    def setup_warnings(self, settings: S, resolver: Resolver) -> list[str]:
        """Problems with the world outside the config (start and reload), as warnings."""
        return []

    def __repr__(self) -> str:
        return f"<check {self.name}>"


class ModuleCheck(Check[S]):
    """The usual shape: the check's module provides `Settings.load` and `check()`; the
    subclass only declares (stages, directions, requires, …)."""

    def __init__(self, load: Callable[[Section], S],
                 run: Callable[[Transaction, Context, S], CheckResult]) -> None:
        self._load = load
        self._run = run

    def load(self, sec: Section) -> S:
        return self._load(sec)

    def run(self, tx: Transaction, ctx: Context, settings: S) -> CheckResult:
        return self._run(tx, ctx, settings)


@dataclass(frozen=True, slots=True)
class Link(Generic[S]):
    """One check in the chain, with its parsed settings and how it is run."""

    check: Check[S]
    settings: S
    mode: Mode
    on_error: Action
    quarantine: Quarantine = Quarantine.HOLD  # how this check's quarantine is carried out

    @property
    def name(self) -> str:
        return self.check.name

    def run(self, tx: Transaction, ctx: Context) -> CheckResult:
        return self.check.run(tx, ctx, self.settings)

    def rate_store(self) -> StoreSpec | None:
        return self.check.rate_store(self.settings)

    def setup_warnings(self, resolver: Resolver) -> list[str]:
        return self.check.setup_warnings(self.settings, resolver)


class Registry:
    """The known checks, in their default order (which obeys every check's order rules)."""

    def __init__(self, checks: Iterable[Check[Any]]) -> None:
        self._checks: dict[str, Check[Any]] = {}
        for c in checks:
            if c.name in self._checks:
                raise ValueError(f"check {c.name!r} registered twice")
            self._checks[c.name] = c
        for c in self._checks.values():
            unknown = [n for n in (*c.requires, *c.after)
                       if n != EVERY_OTHER and n not in self._checks]
            if unknown:
                raise ValueError(f"check {c.name!r} names unknown checks {unknown}")
        problem = self.order_problem(self.default_order)
        if problem:
            raise ValueError(f"the registry's default order breaks a rule: {problem}")

    def __getitem__(self, name: str) -> Check[Any]:
        return self._checks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    def __iter__(self) -> Iterator[Check[Any]]:
        return iter(self._checks.values())

    @property
    def default_order(self) -> tuple[str, ...]:
        return tuple(self._checks)

    def _must_precede(self, check: Check[Any], order: tuple[str, ...]) -> Iterator[str]:
        """Names in `order` that must come before `check`."""
        for name in order:
            if name == check.name:
                continue
            other = self._checks[name]
            if name in check.requires or name in check.after:
                yield name
            elif EVERY_OTHER in check.after and check.name not in (*other.requires,
                                                                  *other.after):
                yield name

    def order_problem(self, order: tuple[str, ...]) -> str:
        """What is wrong with `order` as a chain ('' when nothing): unknown or repeated
        names, a missing requirement, or a check before one it needs."""
        if any(n not in self._checks for n in order):
            return f"check names from {', '.join(self._checks)}"
        if len(set(order)) != len(order):
            return "each check named once"
        for name in order:
            check = self._checks[name]
            missing = [r for r in check.requires if r not in order]
            if missing:
                return (f"{' and '.join(missing)} in the chain, since {name} uses their "
                        "results")
            late = [n for n in self._must_precede(check, order)
                    if order.index(n) > order.index(name)]
            if late:
                why = ("it reports every other check" if EVERY_OTHER in check.after
                       else "it uses their results")
                return f"{' and '.join(late)} before {name}, since {why}"
        return ""

    def section_names(self) -> tuple[str, ...]:
        return tuple(f"check.{name}" for name in self._checks)

    def check_order(self, sec: Section, order: tuple[str, ...]) -> None:
        """Raise a ConfigError naming `[policy] checks` when `order` breaks a rule."""
        problem = self.order_problem(order)
        if problem:
            unknown = [n for n in order if n not in self._checks]
            raise sec.error("checks", problem, unknown[0] if unknown else ", ".join(order))
