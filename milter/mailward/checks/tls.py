"""tls: did the message arrive over TLS, and a recent enough version, where that is required?

Results (reported in Authentication-Results as `x-tls`, as authentication_milter does):
- pass: TLS at or above `min_version`.
- fail: TLS required for this mail, and missing or below `min_version` (the action applies).
- neutral: TLS below `min_version` where TLS is not required.
- none: no TLS, not required.

Where it decides: an inbound sender refused for all mail (`require_inbound`) is refused at
MAIL FROM; a requirement by recipient domain (`require_domains`) or by direction is judged per
recipient at RCPT, so a plain-text sender is refused before DATA either way. At end of message
the check only reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailward.core.check import Context, ModuleCheck
from mailward.core.ini import IPNetwork, Section
from mailward.core.nets import in_networks
from mailward.core.transaction import Direction, Stage, Transaction, domain_of
from mailward.core.verdict import Action, AuthResEntry, CheckResult, Reply, Result

NAME = "tls"

# Versions as Postfix and Sendmail name them in {tls_version}, oldest first.
VERSIONS = ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
ACTIONS = (Action.REJECT, Action.TEMPFAIL, Action.QUARANTINE)


@dataclass(frozen=True)
class Settings:
    """[check.tls]"""

    require_inbound: bool = False
    require_domains: tuple[str, ...] = ()
    require_outbound: bool = False
    require_internal: bool = False
    min_version: str = "TLSv1.2"
    exempt_networks: tuple[IPNetwork, ...] = ()
    action: Action = Action.REJECT
    reply: Reply = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
    version_action: Action = Action.REJECT
    version_reply: Reply = Reply(530, "5.7.0", "A newer TLS version is required")

    @classmethod
    def load(cls, sec: Section) -> Settings:
        def version(raw: str) -> str:
            for v in VERSIONS:
                if v.lower() == raw.lower():
                    return v
            raise ValueError(raw)

        return cls(
            require_inbound=sec.boolean("require_inbound", cls.require_inbound),
            require_domains=sec.domains("require_domains"),
            require_outbound=sec.boolean("require_outbound", cls.require_outbound),
            require_internal=sec.boolean("require_internal", cls.require_internal),
            min_version=sec.parse("min_version", cls.min_version,
                                  f"one of {', '.join(VERSIONS)}", version),
            exempt_networks=sec.networks("exempt_networks", ()),
            action=sec.choice("action", Action, cls.action, ACTIONS),
            reply=sec.reply("reply", str(cls.reply), temporary=False),
            version_action=sec.choice("version_action", Action, cls.version_action, ACTIONS),
            version_reply=sec.reply("version_reply", str(cls.version_reply), temporary=False),
        )


def _rank(version: str) -> int:
    """Order of a version name; an unknown name ranks below all."""
    return VERSIONS.index(version) if version in VERSIONS else -1


def _required(tx: Transaction, settings: Settings, recipients: tuple[str, ...]) -> bool:
    """Is TLS required for this mail to these recipients?"""
    if tx.direction is Direction.OUTBOUND:
        return settings.require_outbound
    if tx.direction is Direction.INTERNAL:
        return settings.require_internal
    if settings.require_inbound:
        return True
    return any(domain_of(r) in settings.require_domains for r in recipients)


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Judge the TLS session of `tx` (see the module docstring for stages and results)."""
    good = tx.tls is not None and _rank(tx.tls.version) >= _rank(settings.min_version)
    if tx.stage is Stage.MAIL:
        # Only the all-inbound requirement is known before the recipients.
        required = tx.direction is Direction.INBOUND and settings.require_inbound
    elif tx.stage is Stage.RCPT:
        required = _required(tx, settings, tx.recipients[-1:])
    else:
        required = _required(tx, settings, tx.recipients)
    if required and in_networks(tx.client_ip, settings.exempt_networks):
        required = False

    if tx.tls is None:
        result = Result.FAIL if required else Result.NONE
        reason = "no TLS"
    elif good:
        result, reason = Result.PASS, tx.tls.version
    else:
        result = Result.FAIL if required else Result.NEUTRAL
        reason = f"{tx.tls.version} is older than {settings.min_version}"

    props: tuple[tuple[str, str, str], ...] = ()
    if tx.tls is not None:
        props = (("smtp", "version", tx.tls.version), ("smtp", "cipher", tx.tls.cipher))
        if tx.tls.bits:
            props += (("smtp", "bits", tx.tls.bits),)
    entry = AuthResEntry("x-tls", result, properties=props)
    if result is not Result.FAIL:
        return CheckResult(NAME, result, reason=reason, authres=(entry,))
    if tx.tls is None:
        action, reply = settings.action, settings.reply
    else:
        action, reply = settings.version_action, settings.version_reply
    return CheckResult(NAME, result, action=action, reply=reply,
                       reason=f"{reason} (TLS required)", authres=(entry,))


class Tls(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.MAIL, Stage.RCPT, Stage.EOM})


CHECK = Tls(Settings.load, check)
