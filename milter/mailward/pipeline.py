"""Run the chain of checks at one stage: classify direction, time each check, contain errors.

An exception inside a check never escapes: it becomes that check's `temperror`, with the
check's `on_error` action (default tempfail 451 4.7.0), so no mail is lost and none slips
through unchecked. In monitor mode a check's action and header edits are recorded as `would`
and not carried out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from mailward.config import Config, Link, Mode
from mailward.counters import Counters
from mailward.deps import Deps
from mailward.dns import Resolver
from mailward.nets import in_networks
from mailward.transaction import Direction, Stage, Transaction, domain_of
from mailward.verdict import Action, CheckResult, Result

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


def _monitor(result: CheckResult) -> CheckResult:
    if result.action is Action.ACCEPT and not result.edits:
        return result
    return dataclasses.replace(result, action=Action.ACCEPT, reply=None, edits=(),
                               would=result.action)


def run_link(link: Link, tx: Transaction, deps: Deps) -> CheckResult:
    """Run one check, containing any exception as a temperror."""
    try:
        result: CheckResult = link.module.check(tx, deps, link.settings)
    except Exception as exc:  # a check must never take the milter down
        log.exception("qid=%s check %s failed at %s", tx.queue_id or "-", link.name,
                      tx.stage.name.lower())
        result = CheckResult(link.name, Result.TEMPERROR, action=link.on_error,
                             reason=f"internal error: {type(exc).__name__}")
    if result.result is Result.TEMPERROR:  # DNS, Redis, a bug: an operator wants to know
        log.warning("qid=%s check %s temperror at %s, %s: %s", tx.queue_id or "-", link.name,
                    tx.stage.name.lower(), result.action, result.reason)
    if link.mode is Mode.MONITOR:
        result = _monitor(result)
    return result


def run(config: Config, stage: Stage, tx: Transaction, observe: Observer | None = None, *,
        resolver: Resolver | None = None, counters: Counters | None = None
        ) -> tuple[Transaction, tuple[CheckResult, ...]]:
    """Run every enabled check that acts at `stage`, in chain order."""
    tx = dataclasses.replace(tx, stage=stage, direction=classify(tx, config))
    results: list[CheckResult] = []
    for link in config.chain:
        if stage not in link.module.STAGES:
            continue
        start = time.perf_counter()
        result = run_link(link, tx, Deps(site=config.milter, dns=resolver, counters=counters,
                                         results=tuple(results)))
        if observe is not None:
            observe(link.name, result, time.perf_counter() - start)
        results.append(result)
    return tx, tuple(results)
