"""The one core entry point: `evaluate(stage, tx, snapshot)` runs the chain and decides.

It classifies the direction, runs every check of the chain that acts at `stage` (in order,
each timed, each given the results before it), and combines the results into a Verdict
(core/policy.py). The milter adapter, `scan`, the benchmarks and the tests all drive stages
through it; nothing else runs checks.

An exception inside a check never escapes: it becomes that check's `temperror`, with the
check's `on_error` action (default tempfail 451 4.7.0), so no mail is lost and none slips
through unchecked. In monitor mode a check's action and header edits are recorded as `would`
and not carried out, except edits a check declares as safety edits (`authres`: forged
fields claiming our authserv-id are deleted and ours is added in every mode).

A check outside its declared directions is not run; it is recorded as `none` ("outbound: not
checked"). A check that reads the result of one that failed internally may not refuse
permanently on it: its reject becomes a tempfail.

`Run` is the same evaluation in steps, for an engine whose thread must not wait (the asyncio
engine, adapter/aio.py): `advance(inline=True)` runs checks on cached DNS answers and stops
before the first check that would have to wait (a lookup the cache cannot answer, or a
rate-limit store in another process), discarding that check's unfinished attempt; the engine
then has a worker thread `advance()` from that check on. No check runs twice to completion,
so nothing is counted twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from mailward.core import policy
from mailward.core.check import EVERY_OTHER, Context, Link, Service
from mailward.core.config import Config
from mailward.core.nets import in_networks
from mailward.core.settings import Mode
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import Direction, Stage, Transaction, domain_of
from mailward.core.verdict import Action, CheckResult, Result, Verdict
from mailward.services.dns import Budget, Gate, WouldWait

log = logging.getLogger(__name__)

Observer = Callable[[str, CheckResult, float], None]


def classify(tx: Transaction, config: Config) -> Direction:
    """Inbound, outbound or internal (see `Direction`) from auth, daemon name and networks."""
    site = config.milter
    ours = (bool(tx.auth_user)
            or (bool(tx.daemon_name) and tx.daemon_name in site.originating_daemons)
            or in_networks(tx.client_ip, site.trusted_networks))
    if not ours:
        return Direction.INBOUND
    if site.local_domains and tx.recipients and all(
            domain_of(r) in site.local_domains for r in tx.recipients):
        return Direction.INTERNAL
    return Direction.OUTBOUND


def _monitor(result: CheckResult, *, keep_edits: bool) -> CheckResult:
    if result.action is Action.ACCEPT and (keep_edits or not result.edits):
        return result
    return dataclasses.replace(result, action=Action.ACCEPT, reply=None,
                               edits=result.edits if keep_edits else (), would=result.action)


def run_link(link: Link[Any], tx: Transaction, ctx: Context) -> CheckResult:
    """Run one check, containing any exception as a temperror."""
    if tx.direction not in link.check.directions:
        return CheckResult(link.name, Result.NONE, reason=f"{tx.direction}: not checked")
    try:
        result = link.run(tx, ctx)
    except Exception as exc:  # a check must never take the milter down
        log.exception("qid=%s check %s failed at %s", tx.queue_id or "-", link.name,
                      tx.stage.name.lower())
        result = CheckResult(link.name, Result.TEMPERROR, action=link.on_error,
                             reason=f"internal error: {type(exc).__name__}",
                             internal_error=True)
    if result.result is Result.TEMPERROR and not ctx.dns.refused:  # DNS, Redis, a bug
        log.warning("qid=%s check %s temperror at %s, %s: %s", tx.queue_id or "-", link.name,
                    tx.stage.name.lower(), result.action, result.reason)
    if link.mode is Mode.MONITOR:
        result = _monitor(result, keep_edits=link.check.safety_edits)
    return result


def _inputs(link: Link[Any], before: list[CheckResult]) -> set[str]:
    """The earlier checks whose results `link` reads."""
    check = link.check
    if EVERY_OTHER in check.after:
        return {r.check for r in before}
    return set(check.requires) | set(check.after)


def _contain(result: CheckResult, broken: set[str], config: Config) -> CheckResult:
    """A refusal built on the stand-in result of a check that failed internally would turn a
    bug into a lost message: it becomes a tempfail (the sender retries)."""
    if not broken or result.action is not Action.REJECT:
        return result
    return dataclasses.replace(
        result, action=Action.TEMPFAIL, reply=config.policy.error_reply,
        reason=f"{result.reason} (not refused: {', '.join(sorted(broken))} failed internally)")


class Run:
    """The checks of one stage on one transaction, run by `advance` (see the module doc)."""

    def __init__(self, stage: Stage, tx: Transaction, snapshot: Snapshot, *,
                 budget: Budget | None = None, observe: Observer | None = None) -> None:
        config = snapshot.config
        self.snapshot = snapshot
        self.tx = dataclasses.replace(tx, stage=stage, direction=classify(tx, config))
        self.gate = Gate()
        self.dns = snapshot.resolver.bind(budget if budget is not None
                                          else Budget(config.dns.budget), self.gate)
        self.observe = observe
        self.links = [link for link in config.chain if stage in link.check.stages]
        self.results: list[CheckResult] = []
        self.broken: set[str] = set()
        self.waits = 0  # how often an inline advance stopped

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.links)

    def advance(self, *, inline: bool = False) -> bool:
        """Run the checks not yet run; return whether all have. With `inline`, stop (and
        return False) before a check that would wait."""
        config = self.snapshot.config
        self.gate.inline = inline
        try:
            while not self.done:
                link = self.links[len(self.results)]
                if inline and self._remote(link):
                    self.waits += 1
                    return False
                start = time.perf_counter()
                ctx = Context(site=config.milter, dns=self.dns, rates=self.snapshot.rates,
                              results=tuple(self.results), metrics=self.snapshot.metrics)
                try:
                    result: CheckResult | None = run_link(link, self.tx, ctx)
                except WouldWait:
                    result = None
                if result is None or self.gate.refused:  # a library may swallow WouldWait
                    self.gate.refused = False
                    self.waits += 1
                    return False
                if self.broken:  # only after an internal error: the usual path does no work
                    result = _contain(result, _inputs(link, self.results) & self.broken,
                                      config)
                if result.internal_error:
                    self.broken.add(link.name)
                if self.observe is not None:
                    self.observe(link.name, result, time.perf_counter() - start)
                self.results.append(result)
            return True
        finally:
            self.gate.inline = False

    def _remote(self, link: Link[Any]) -> bool:
        """Would `link` wait for another process, whatever the DNS cache holds?"""
        return (Service.RATES in link.check.uses and self.tx.direction in link.check.directions
                and self.snapshot.rates.spec.backend != "memory")

    def verdict(self) -> tuple[Transaction, Verdict]:
        """The transaction as the checks saw it and the verdict, once `done`."""
        if not self.done:
            raise RuntimeError("the verdict of a stage whose checks have not all run")
        config = self.snapshot.config
        verdict = policy.decide(tuple(self.results), config.policy,
                                final=self.tx.stage is Stage.EOM)
        if verdict.action is Action.QUARANTINE:
            modes = {link.name: link.quarantine for link in config.chain}
            verdict = policy.carry_out_quarantine(verdict, self.tx.headers, self.tx.direction,
                                                  config.policy, modes)
        return self.tx, verdict


def evaluate(stage: Stage, tx: Transaction, snapshot: Snapshot, *,
             budget: Budget | None = None, observe: Observer | None = None
             ) -> tuple[Transaction, Verdict]:
    """Run the checks of `stage` on `tx` and decide.

    Returns the transaction as the checks saw it (stage and direction set) and the verdict;
    before end of message only a reject or tempfail is decisive. `budget` is the message's DNS
    time (one per transaction, shared by its stages); a fresh one when not given.
    """
    run = Run(stage, tx, snapshot, budget=budget, observe=observe)
    run.advance()
    return run.verdict()
