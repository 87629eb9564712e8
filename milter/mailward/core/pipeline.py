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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from mailward.core import policy
from mailward.core.check import EVERY_OTHER, Context, Link
from mailward.core.config import Config
from mailward.core.nets import in_networks
from mailward.core.settings import Mode
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import Direction, Stage, Transaction, domain_of
from mailward.core.verdict import Action, CheckResult, Result, Verdict
from mailward.services.dns import Budget

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
    if result.result is Result.TEMPERROR:  # DNS, Redis, a bug: an operator wants to know
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


def evaluate(stage: Stage, tx: Transaction, snapshot: Snapshot, *,
             budget: Budget | None = None, observe: Observer | None = None
             ) -> tuple[Transaction, Verdict]:
    """Run the checks of `stage` on `tx` and decide.

    Returns the transaction as the checks saw it (stage and direction set) and the verdict;
    before end of message only a reject or tempfail is decisive. `budget` is the message's DNS
    time (one per transaction, shared by its stages); a fresh one when not given.
    """
    config = snapshot.config
    tx = dataclasses.replace(tx, stage=stage, direction=classify(tx, config))
    if budget is None:
        budget = Budget(config.dns.budget)
    dns = snapshot.resolver.bind(budget)
    results: list[CheckResult] = []
    broken: set[str] = set()
    for link in config.chain:
        if stage not in link.check.stages:
            continue
        start = time.perf_counter()
        ctx = Context(site=config.milter, dns=dns, rates=snapshot.rates,
                      results=tuple(results), metrics=snapshot.metrics)
        result = run_link(link, tx, ctx)
        if broken:  # only after an internal error: the usual path does no work here
            result = _contain(result, _inputs(link, results) & broken, config)
        if result.internal_error:
            broken.add(link.name)
        if observe is not None:
            observe(link.name, result, time.perf_counter() - start)
        results.append(result)
    verdict = policy.decide(tuple(results), config.policy, final=stage is Stage.EOM)
    if verdict.action is Action.QUARANTINE:
        modes = {link.name: link.quarantine for link in config.chain}
        verdict = policy.carry_out_quarantine(verdict, tx.headers, tx.direction, config.policy,
                                              modes)
    return tx, verdict
