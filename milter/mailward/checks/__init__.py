"""The registry of checks: an explicit name → module mapping, in the default order.

Each module exports `NAME`, `STAGES` (the protocol stages where it runs), a frozen `Settings`
with `Settings.load(section)`, and `check(tx, deps, settings) -> CheckResult`. Checks never
import each other; a check that needs another's result reads it from `deps.results`.
"""

from types import MappingProxyType

from mailward.checks import (
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

CHECKS = MappingProxyType({
    tls.NAME: tls,
    sender.NAME: sender,
    ratelimit.NAME: ratelimit,
    spf.NAME: spf,
    dkim.NAME: dkim,
    dmarc.NAME: dmarc,
    bcc.NAME: bcc,
    trace.NAME: trace,
    dkim_sign.NAME: dkim_sign,
    authres.NAME: authres,
})
