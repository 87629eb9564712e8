"""mailward audit: check the MTA and our own domains against the practices mailward stands for.

The MTA part reads Postfix's effective settings (`postconf -x`, and `postconf -P` for the
services of master.cf), of this host or of a given configuration directory. The domain part
asks DNS, through the same resolver as the milter ([dns]), about every domain of
`[milter] local_domains`. Each finding is pass, warn or fail, with the fix.

For MTA-STS it fetches the policy file as a sending MTA would (`[sts]` ca_file and https_port
apply) and compares its `mx` patterns with the domain's MX records.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from mailward.core.config import Config
from mailward.core.settings import StsSettings
from mailward.errors import MailwardError
from mailward.services import keys
from mailward.services.dns import DnsError, Resolver
from mailward.sts.fetch import FetchError, fetch_policy, tls_context
from mailward.sts.policy import Mode as StsMode
from mailward.sts.policy import mx_matches, parse_txt

PASS, WARN, FAIL = "pass", "warn", "fail"
OLD_TLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1")
SPF_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")  # RFC 7208 §4.6.4
MAX_SPF_RECORDS = 30  # records fetched while counting one domain's lookups


@dataclass(frozen=True)
class Finding:
    area: str  # "mta", or the domain
    check: str
    status: str
    detail: str
    fix: str = ""


def postconf(config_dir: str = "") -> tuple[dict[str, str], dict[str, str]]:
    """Postfix's main.cf parameters (expanded) and master.cf service parameters."""
    base = ["postconf"] + (["-c", config_dir] if config_dir else [])

    def run(*args: str) -> dict[str, str]:
        try:
            done = subprocess.run([*base, *args], capture_output=True, text=True, check=False,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MailwardError(f"cannot run postconf: {exc}") from None
        if done.returncode != 0:
            raise MailwardError(f"postconf failed: {done.stderr.strip()}")
        out = {}
        for line in done.stdout.splitlines():
            name, sep, value = line.partition(" = ")
            if sep:
                out[name.strip()] = value.strip()
            elif line.endswith(" ="):
                out[line[:-2].strip()] = ""
        return out

    return run("-x"), run("-P")


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", value) if w]


def _tls_allows_old(value: str) -> list[str]:
    """The protocols older than TLS 1.2 a *_tls_protocols value leaves enabled."""
    words = _words(value)
    floors = [w[2:] for w in words if w.startswith(">=")]
    if any(f in ("TLSv1.2", "TLSv1.3") for f in floors):
        return []
    start = OLD_TLS.index(floors[0]) if floors and floors[0] in OLD_TLS else 0
    return [p for p in OLD_TLS[start:] if f"!{p}" not in words]


def _milter_names(socket: str) -> list[str]:
    """How smtpd_milters can name mailward's socket."""
    kind, _, rest = socket.partition(":")
    if kind in ("unix", "local"):
        names = [rest]
        if rest.startswith("/var/spool/postfix/"):
            names.append(rest.removeprefix("/var/spool/postfix"))
        return names
    port, _, host = rest.partition("@")
    return [f"inet:{host}:{port}", f"{host}:{port}"]


def mta_findings(conf: dict[str, str], services: dict[str, str], socket: str) -> list[Finding]:
    out: list[Finding] = []

    def add(check: str, ok: bool, detail: str, fix: str, bad: str = FAIL) -> None:
        out.append(Finding("mta", check, PASS if ok else bad, detail, "" if ok else fix))

    get = conf.get
    restrictions = _words(get("smtpd_relay_restrictions", "")) + _words(
        get("smtpd_recipient_restrictions", ""))
    guarded = any(r in restrictions for r in ("reject_unauth_destination",
                                              "defer_unauth_destination"))
    add("open-relay", guarded,
        "relay restrictions " + ("refuse" if guarded else "do not refuse")
        + " unauthorised destinations",
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
        "defer_unauth_destination")
    wide = []
    for word in _words(get("mynetworks", "")):
        try:
            net = ipaddress.ip_network(word.strip("[]").replace("]/", "/"), strict=False)
        except ValueError:
            continue
        if net.prefixlen < (8 if net.version == 4 else 32):
            wide.append(str(net))
    add("mynetworks", not wide, f"mynetworks = {get('mynetworks', '')}",
        "list only your own hosts in mynetworks (e.g. 127.0.0.0/8 [::1]/128); "
        f"{', '.join(wide)} trusts much of the Internet")
    level = get("smtpd_tls_security_level", "")
    add("starttls-inbound", level in ("may", "encrypt", "dane", "secure"),
        f"smtpd_tls_security_level = {level or '(none)'}",
        "smtpd_tls_security_level = may, with smtpd_tls_chain_files set")
    for side in ("smtpd", "smtp"):
        for kind in ("protocols", "mandatory_protocols"):
            name = f"{side}_tls_{kind}"
            old = _tls_allows_old(get(name, ""))
            add(f"{name}", not old, f"{name} = {get(name, '')}",
                f"{name} = >=TLSv1.2", WARN)
    if get("smtpd_sasl_auth_enable", "no") == "yes":
        add("auth-over-tls", get("smtpd_tls_auth_only", "no") == "yes",
            f"smtpd_tls_auth_only = {get('smtpd_tls_auth_only', 'no')}",
            "smtpd_tls_auth_only = yes (passwords never in clear text)")
    add("vrfy", get("disable_vrfy_command", "no") == "yes",
        f"disable_vrfy_command = {get('disable_vrfy_command', 'no')}",
        "disable_vrfy_command = yes (VRFY lists valid addresses)", WARN)
    banner = get("smtpd_banner", "")
    versioned = bool(re.search(r"\d+\.\d+", banner))
    add("banner", not versioned, f"smtpd_banner = {banner}",
        "smtpd_banner = $myhostname ESMTP (no software version)", WARN)
    add("helo-required", get("smtpd_helo_required", "no") == "yes",
        f"smtpd_helo_required = {get('smtpd_helo_required', 'no')}",
        "smtpd_helo_required = yes", WARN)
    limited = any(get(k, "0") not in ("0", "") for k in (
        "smtpd_client_connection_rate_limit", "smtpd_client_message_rate_limit"))
    add("rate-limits", limited, "smtpd_client_connection_rate_limit = "
        f"{get('smtpd_client_connection_rate_limit', '0')}, smtpd_client_message_rate_limit = "
        f"{get('smtpd_client_message_rate_limit', '0')}",
        "smtpd_client_connection_rate_limit = 30 and smtpd_client_message_rate_limit = 100 "
        "(anvil), or [check.ratelimit] limits", WARN)
    action = get("milter_default_action", "")
    add("milter-default-action", action == "tempfail", f"milter_default_action = {action}",
        "milter_default_action = tempfail (mail waits while mailward is down; accept lets it "
        "through unchecked)")
    names = _milter_names(socket)
    for param in ("smtpd_milters", "non_smtpd_milters"):
        value = get(param, "")
        add(param, any(n in value for n in names), f"{param} = {value or '(none)'}",
            f"{param} = " + (f"unix:{names[-1]}" if socket.startswith(("unix", "local"))
                             else names[0]),
            FAIL if param == "smtpd_milters" else WARN)
    originating = any(k.endswith("/milter_macro_daemon_name") and v == "ORIGINATING"
                      for k, v in services.items())
    add("submission-originating", originating,
        "a master.cf service sets milter_macro_daemon_name = ORIGINATING" if originating
        else "no master.cf service marks submitted mail ORIGINATING",
        "in master.cf, under submission: -o milter_macro_daemon_name=ORIGINATING", WARN)
    sts = "socketmap:" in get("smtp_tls_policy_maps", "")
    add("sts-policy-map", sts,
        f"smtp_tls_policy_maps = {get('smtp_tls_policy_maps', '') or '(none)'}",
        "smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix with mailward's MTA-STS "
        "policy service (mailward-sts.service), so mail to domains that ask for TLS never "
        "goes in clear text", WARN)
    return out


def spf_lookups(domain: str, resolver: Resolver) -> tuple[str | None, int]:
    """The domain's SPF record and how many DNS-querying terms evaluating it may take (RFC
    7208 §4.6.4: at most 10), following include: and redirect= (bounded)."""
    fetched = 0

    def record(name: str) -> str | None:
        nonlocal fetched
        fetched += 1
        found = [r for r in _texts(resolver, name) if r.lower().startswith("v=spf1")
                 and (len(r) == 6 or r[6] == " ")]
        return found[0] if len(found) == 1 else None

    def count(text: str, depth: int) -> int:
        total = 0
        for raw in text.split()[1:]:
            term = raw.lstrip("+-~?").lower()
            name = re.match(r"[a-z0-9.]*", term).group()  # type: ignore[union-attr]
            if name not in SPF_LOOKUP_TERMS:
                continue
            total += 1
            target = term.partition(":")[2] if name == "include" else (
                term.partition("=")[2] if name == "redirect" else "")
            if target and depth < 10 and fetched < MAX_SPF_RECORDS:
                inner = record(target)
                if inner is not None:
                    total += count(inner, depth + 1)
        return total

    top = record(domain)
    return top, (count(top, 0) if top is not None else 0)


def _texts(resolver: Resolver, name: str) -> list[str]:
    """TXT records as text (bytes that are not ASCII become U+FFFD: they match nothing)."""
    return [r.decode("ascii", "replace") for r in resolver.txt(name)]


def _txt(resolver: Resolver, name: str, prefix: str) -> list[str]:
    return [r for r in _texts(resolver, name) if r.lower().startswith(prefix)]


def sts_policy(domain: str, resolver: Resolver, settings: StsSettings,
               add: Callable[..., None]) -> None:
    """The policy file behind a valid `_mta-sts` record: reachable, enforcing, and naming
    every MX host (senders that enforce it refuse an MX it does not name)."""
    check = "mta-sts-policy"
    try:
        got = fetch_policy(domain, resolver, settings, tls_context(settings.ca_file))
    except FetchError as exc:
        add(check, FAIL, f"policy not available ({exc})", f"serve https://mta-sts.{domain}/"
            ".well-known/mta-sts.txt (text/plain, a certificate valid for that name, no "
            "redirect): senders ignore the TXT record without it")
        return
    policy = got.policy
    mx = sorted({str(r.exchange).rstrip(".").lower() for r in resolver.query(domain, "MX")})
    unnamed = [h for h in mx if not any(mx_matches(p, h) for p in policy.mx)]
    summary = f"mode={policy.mode} max_age={policy.max_age} mx={','.join(policy.mx) or '-'}"
    if policy.mode is StsMode.ENFORCE and unnamed:
        add(check, FAIL, f"{summary}; MX {', '.join(unnamed)} not named: senders enforcing "
            "the policy will not deliver there", "add the MX host names to the policy's mx: "
            "lines (and change the TXT id)")
    elif policy.mode is not StsMode.ENFORCE:
        extra = f"; MX {', '.join(unnamed)} not named" if unnamed else ""
        add(check, WARN, f"{summary}{extra}: senders do not refuse clear text",
            "move to mode: enforce once TLS reports show no failures (change the TXT id)")
    elif policy.max_age < 86400:
        add(check, WARN, f"{summary}: a short max_age leaves little protection when the "
            "policy host is unreachable", "max_age: 604800 or more (RFC 8461 suggests weeks)")
    else:
        add(check, PASS, summary)


def domain_findings(domain: str, resolver: Resolver,
                    signing: Iterable[keys.SigningKey],
                    sts: StsSettings = StsSettings()) -> list[Finding]:  # noqa: B008 - frozen
    out: list[Finding] = []

    def add(check: str, status: str, detail: str, fix: str = "") -> None:
        out.append(Finding(domain, check, status, detail, fix if status != PASS else ""))

    def guarded(check: str, probe: Callable[[], None]) -> None:
        try:
            probe()
        except DnsError as exc:
            add(check, FAIL, f"lookup failed: {exc}", "check [dns] and the domain's servers")

    def spf() -> None:
        record, lookups = spf_lookups(domain, resolver)
        if record is None:
            add("spf", FAIL, "no single v=spf1 record",
                f'publish one: {domain}. TXT "v=spf1 mx -all"')
        elif not re.search(r"\s[-~]all$", record) and "redirect=" not in record:
            add("spf", FAIL, f"{record!r} does not end in -all or ~all",
                "end the record with -all (or ~all while testing)")
        elif lookups > 10:
            add("spf", FAIL, f"{lookups} DNS lookups (RFC 7208 allows 10): permerror",
                "flatten includes into ip4:/ip6: terms")
        else:
            add("spf", PASS, f"{record} ({lookups} lookups)")

    def dkim() -> None:
        mine = [k for k in signing if k.domain == domain]
        if not mine:
            add("dkim", WARN, "no signing key configured for this domain",
                "mailward keygen, publish the record, add it to [check.dkim_sign] keys")
        for key in mine:
            status = keys.key_status(key, resolver)
            add("dkim", PASS if status == "published" else FAIL,
                f"{keys.record_name(key.domain, key.selector)}: {status}",
                "publish the record mailward keygen printed (mailward keycheck checks it)")

    def dmarc() -> None:
        records = _txt(resolver, f"_dmarc.{domain}", "v=dmarc1")
        if len(records) != 1:
            add("dmarc", FAIL, f"{len(records)} DMARC records at _dmarc.{domain}",
                f'publish one: _dmarc.{domain}. TXT "v=DMARC1; p=quarantine; '
                f'rua=mailto:dmarc@{domain}"')
            return
        tags = {k.strip().lower(): v.strip() for k, _, v in
                (t.partition("=") for t in records[0].split(";"))}
        policy = tags.get("p", "").lower()
        if policy not in ("quarantine", "reject"):
            add("dmarc", WARN, f"p={policy or '(missing)'}: monitoring only",
                "move to p=quarantine, then p=reject, once the reports show only your senders")
        elif tags.get("t", "").lower() == "y":
            add("dmarc", WARN, f"p={policy} in test mode (t=y)", "drop t=y when ready")
        else:
            add("dmarc", PASS, records[0])
        if "rua" not in tags:
            add("dmarc-rua", WARN, "no rua=: nobody tells you who sends as this domain",
                f"add rua=mailto:dmarc@{domain}")

    def mta_sts() -> None:
        found = _txt(resolver, f"_mta-sts.{domain}", "v=stsv1")
        policy_id = parse_txt(tuple(r.encode() for r in found))
        if len(found) == 1 and policy_id is None:
            add("mta-sts", FAIL, f"{found[0]!r} is not a valid MTA-STS record",
                f'publish _mta-sts.{domain}. TXT "v=STSv1; id=YYYYMMDDHHMMSS"')
            return
        add("mta-sts", PASS if policy_id else WARN,
            found[0] if policy_id else "no _mta-sts TXT record (senders may deliver in "
            "clear text to a forged MX)",
            "publish _mta-sts TXT \"v=STSv1; id=...\" and https://mta-sts.DOMAIN/.well-known/"
            "mta-sts.txt")
        if policy_id:
            sts_policy(domain, resolver, sts, add)


    def tls_rpt() -> None:
        found = _txt(resolver, f"_smtp._tls.{domain}", "v=tlsrptv1")
        add("tls-rpt", PASS if len(found) == 1 else WARN,
            found[0] if len(found) == 1 else "no _smtp._tls TXT record",
            f'publish _smtp._tls.{domain}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"')

    for check, probe in (("spf", spf), ("dkim", dkim), ("dmarc", dmarc),
                         ("mta-sts", mta_sts), ("tls-rpt", tls_rpt)):
        guarded(check, probe)
    return out


def run(cfg: Config, config_dir: str = "", *, with_mta: bool = True) -> list[Finding]:
    findings: list[Finding] = []
    if with_mta:
        conf, services = postconf(config_dir)
        findings += mta_findings(conf, services, cfg.milter.socket)
    resolver = Resolver(cfg.dns)
    signing = [k for link in cfg.chain if link.name in ("dkim_sign", "arc_seal")
               for k in _keys(link.settings)]
    for domain in cfg.milter.local_domains:
        findings += domain_findings(domain, resolver, signing, cfg.sts)
    if not cfg.milter.local_domains:
        findings.append(Finding("domains", "local-domains", WARN,
                                "[milter] local_domains is empty: no domain checked",
                                "list your domains in [milter] local_domains"))
    return findings


def _keys(settings: object) -> tuple[keys.SigningKey, ...]:
    loaded = getattr(settings, "loaded", ())
    return loaded if isinstance(loaded, tuple) else (loaded,) if loaded else ()


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.status.upper():<5} {f.area:<20} {f.check:<30} {f.detail}")
        if f.fix:
            lines.append(f"{'':<5} {'':<20} {'':<30} fix: {f.fix}")
    return "\n".join(lines) + "\n"


def as_json(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]
