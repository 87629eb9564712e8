"""The registry of checks, in the default order: the one place where that order is written.

Each module exports `NAME`, a frozen `Settings`, `check(tx, ctx, settings) -> CheckResult` and
`CHECK`, an instance of its `core.check.Check` subclass declaring stages, directions, the checks
it needs before it and the services it uses. Checks never import each other; a check that needs
another's findings reads its typed outcome (`ctx.outcome(SpfOutcome)`).

Only the entry points (cli, app, bench, tests) import this registry and hand it to the config
loader; the core never imports a check.
"""

from mailward.checks import (
    arc,
    arc_seal,
    authres,
    bcc,
    dkim,
    dkim_sign,
    dmarc,
    ratelimit,
    sender,
    spf,
    tls,
    trace,
)
from mailward.core.check import Registry

REGISTRY = Registry((
    tls.CHECK,
    sender.CHECK,
    ratelimit.CHECK,
    spf.CHECK,
    dkim.CHECK,
    arc.CHECK,
    dmarc.CHECK,
    bcc.CHECK,
    trace.CHECK,
    dkim_sign.CHECK,
    authres.CHECK,
    arc_seal.CHECK,
))
