"""sender: may this client use these sender addresses, and relay to these recipients?

Three rules, each its own defence:
- Ownership (authenticated clients): the MAIL FROM address (at MAIL FROM) and every From
  address (at end of message) must be allowed for the SASL login (`{auth_authen}`) by
  `map_file` (lines `login: address, @domain, ...`; `#` comments), or, for logins without an
  entry, be the login itself. Mismatch → `553 5.7.1 Sender address not owned by authenticated
  user`. The null sender `<>` is allowed (bounces).
- Own domains from outside: an unauthenticated client outside `trusted_networks` using one of
  `[milter] local_domains` in MAIL FROM is refused (`own_domain_action`, default reject); in the
  From field only when `own_domain_header_action` says so (mailing lists keep From).
- Relay guard (`relay_guard`, on by default): with `local_domains` set, a RCPT to another
  domain from such a client is refused `554 5.7.1 Relay access denied`, whatever the MTA's
  own relay settings say.

Results: pass (owned / allowed), fail (refused, or would be in monitor mode), none (rule does
not apply). The map file is read when the config is (start-up, reload).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailward.core.addresses import AuthorProblem, authors, normalise_domain
from mailward.core.check import Context, ModuleCheck
from mailward.core.ini import Section
from mailward.core.settings import MilterSettings
from mailward.core.transaction import Direction, Stage, Transaction, domain_of
from mailward.core.verdict import Action, CheckResult, Reply, Result

NAME = "sender"
ACTIONS = (Action.REJECT, Action.ACCEPT, Action.QUARANTINE, Action.TEMPFAIL)


def load_map(path: str) -> dict[str, tuple[str, ...]]:
    """Parse a sender map file; ValueError names the file and line."""
    entries: dict[str, tuple[str, ...]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        login, colon, rest = line.partition(":")
        allowed = tuple(a.strip().lower() for a in rest.replace(",", " ").split())
        if not colon or not login.strip() or not allowed or not all("@" in a for a in allowed):
            raise ValueError(f"{path}:{number}: expected 'login: address, @domain, ...'")
        entries[login.strip().lower()] = allowed
    return entries


@dataclass(frozen=True)
class Settings:
    """[check.sender]"""

    map_file: str = ""
    mismatch_action: Action = Action.REJECT
    mismatch_reply: Reply = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
    own_domain_action: Action = Action.REJECT
    own_domain_header_action: Action = Action.ACCEPT
    own_domain_reply: Reply = Reply(550, "5.7.1", "Our domain may only be used by our users")
    relay_guard: bool = True
    relay_reply: Reply = Reply(554, "5.7.1", "Relay access denied")
    owners: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, sec: Section) -> Settings:
        path = sec.string("map_file", "")
        owners = {}
        if path:
            try:
                owners = load_map(path)
            except ValueError as exc:
                raise sec.error("map_file", f"a readable sender map ({exc})", path) from None
        return cls(
            map_file=path, owners=owners,
            mismatch_action=sec.choice("mismatch_action", Action, cls.mismatch_action, ACTIONS),
            mismatch_reply=sec.reply("mismatch_reply", str(cls.mismatch_reply),
                                     temporary=False),
            own_domain_action=sec.choice("own_domain_action", Action, cls.own_domain_action,
                                         ACTIONS),
            own_domain_header_action=sec.choice("own_domain_header_action", Action,
                                                cls.own_domain_header_action, ACTIONS),
            own_domain_reply=sec.reply("own_domain_reply", str(cls.own_domain_reply),
                                       temporary=False),
            relay_guard=sec.boolean("relay_guard", cls.relay_guard),
            relay_reply=sec.reply("relay_reply", str(cls.relay_reply), temporary=False),
        )

    def owns(self, login: str, address: str) -> bool:
        """May `login` use `address`? (the map, else the login itself)"""
        login, address = login.lower(), address.lower()
        local, _, domain = address.rpartition("@")
        address = f"{local}@{normalise_domain(domain) or domain}"
        rules = self.owners.get(login, (login,))
        return any(address == r or (r.startswith("@") and address.endswith(r)
                                    and address.count("@") == 1) for r in rules)


def _result(result: Result, action: Action, reply: Reply, reason: str) -> CheckResult:
    if action is Action.ACCEPT:
        return CheckResult(NAME, result, reason=reason)
    return CheckResult(NAME, result, action=action, reason=reason,
                       reply=reply if action in (Action.REJECT, Action.TEMPFAIL) else None)


def check(tx: Transaction, ctx: Context, settings: Settings) -> CheckResult:
    """Apply the rule of this stage (see the module docstring)."""
    ours = ctx.site.local_domains
    if tx.auth_user:
        if tx.stage is Stage.MAIL:
            addresses = [tx.mail_from] if tx.mail_from else []
        elif tx.stage is Stage.EOM:
            found = authors(tx)
            if found.problem not in (None, AuthorProblem.NO_FIELD):
                # a From we cannot read with certainty is not one this user may send
                return _result(Result.FAIL, settings.mismatch_action, settings.mismatch_reply,
                               f"{tx.auth_user}: {found.reason}")
            addresses = [f"{local}@{domain}" for local, domain in found.addresses]
        else:
            return CheckResult(NAME, Result.NONE)
        refused = [a for a in addresses if not settings.owns(tx.auth_user, a)]
        if refused:
            return _result(Result.FAIL, settings.mismatch_action, settings.mismatch_reply,
                           f"{tx.auth_user} may not send as {', '.join(refused)}")
        return CheckResult(NAME, Result.PASS if addresses else Result.NONE)
    if tx.direction is not Direction.INBOUND or not ours:
        return CheckResult(NAME, Result.NONE)
    if tx.stage is Stage.RCPT and settings.relay_guard:
        rcpt_domain = domain_of(tx.recipients[-1])
        if rcpt_domain not in ours:
            return _result(Result.FAIL, Action.REJECT, settings.relay_reply,
                           f"relay to {rcpt_domain} refused")
        return CheckResult(NAME, Result.PASS)
    if tx.stage is Stage.MAIL and domain_of(tx.mail_from) in ours:
        return _result(Result.FAIL, settings.own_domain_action, settings.own_domain_reply,
                       f"unauthenticated use of {domain_of(tx.mail_from)} in MAIL FROM")
    if tx.stage is Stage.EOM:
        spoofed = sorted(set(authors(tx).domains) & set(ours))
        if spoofed:
            return _result(Result.FAIL, settings.own_domain_header_action,
                           settings.own_domain_reply,
                           f"unauthenticated use of {', '.join(spoofed)} in From")
    return CheckResult(NAME, Result.NONE)


class Sender(ModuleCheck[Settings]):
    name = NAME
    stages = frozenset({Stage.MAIL, Stage.RCPT, Stage.EOM})

    def config_warnings(self, settings: Settings, site: MilterSettings) -> list[str]:
        if site.local_domains:
            return []
        return ["[milter] local_domains is empty: the sender check's relay guard and "
                "own-domain rule are off"]


CHECK = Sender(Settings.load, check)
