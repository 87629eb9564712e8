"""mailward is a mail filter (milter) for Postfix and Sendmail. For each SMTP transaction
it runs a chain of checks (TLS required, SPF, DKIM, ARC, DMARC, forged Authentication-Results,
Bcc and trace headers, sender identity, rate limits) and answers accept, reject, tempfail or
quarantine, with an Authentication-Results field that says why. Around the milter: DKIM and ARC
signing keys, an MTA-STS policy service for Postfix's SMTP client, DMARC aggregate reports
in both directions, and an audit of the MTA and its domains."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from mailward import __version__
from mailward.app import App
from mailward.checks import REGISTRY
from mailward.checks.tls import VERSIONS as TLS_VERSIONS
from mailward.core import config as configmod
from mailward.errors import MailwardError
from mailward.services import keys
from mailward.services.dns import DnsError, Resolver
from mailward.services.metrics import Metrics

# The other commands' modules (audit, scan, sts, reports, the lab) are imported by the command
# that needs them: the milter (`run`) is a long-lived process, and what it never uses it
# should not hold in memory.

DEFAULT_CONFIG = "/etc/mailward/mailward.ini"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s mailward[%(process)d] %(levelname)s %(name)s: "
                               "%(message)s")


def cmd_run(args: argparse.Namespace) -> int:
    app = App(args.config)
    _setup_logging(app.config.milter.log_level)
    for warning in app.config.warnings:
        logging.getLogger("mailward").warning("%s", warning)
    app.run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config, REGISTRY)
    sys.stdout.write(f"# {args.config}: OK\n")
    for warning in cfg.warnings:
        sys.stdout.write(f"# warning: {warning}\n")
    sys.stdout.write(configmod.describe(cfg))
    return 0


class UsageError(MailwardError):
    """A command-line argument is unusable; the message names it."""


def cmd_scan(args: argparse.Namespace) -> int:
    from mailward.core.snapshot import build  # noqa: PLC0415 - see the imports above
    from mailward.scan import report_dict, scan  # noqa: PLC0415
    if args.client_ip:
        try:
            ipaddress.ip_address(args.client_ip)
        except ValueError:
            raise UsageError(f"--client-ip: {args.client_ip!r} is not an IP address") from None
    if args.config:
        cfg = configmod.load(args.config, REGISTRY)
    elif os.path.exists(DEFAULT_CONFIG):
        cfg = configmod.load(DEFAULT_CONFIG, REGISTRY)
    else:
        cfg = configmod.loads("", REGISTRY, "<defaults>")
    if args.file == "-":
        raw = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as fh:
            raw = fh.read()
    report = scan(build(cfg), raw, client_ip=args.client_ip, helo=args.helo,
                  mail_from=args.mail_from, rcpts=tuple(args.rcpt or ["postmaster@localhost"]),
                  tls_version=args.tls_version, auth_user=args.auth_user,
                  daemon_name=args.daemon_name)
    data = report_dict(report)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(data))
    final = data["final"]
    refused = final is None or (isinstance(final, dict) and final["action"] != "accept")
    return 2 if refused else 0


def format_report(data: dict[str, object]) -> str:
    """Human-readable `scan` output."""
    lines = [f"direction: {data['direction']}"]

    def verdict(title: str, v: dict[str, object]) -> None:
        reply = f"  {v['reply']}" if v["reply"] else ""
        by = f"  (by {v['decided_by']})" if v["decided_by"] else ""
        lines.append(f"{title}: {v['action']}{reply}{by}")

    verdict("MAIL FROM", data["mail"])  # type: ignore[arg-type]
    for rcpt, v in data["rcpts"].items():  # type: ignore[attr-defined]
        verdict(f"RCPT TO <{rcpt}>", v)
    final = data["final"]
    if not isinstance(final, dict):
        lines.append("end of message: not reached (refused before DATA)")
        return "\n".join(lines) + "\n"
    verdict("end of message", final)
    if final["quarantine"]:
        lines.append(f"  quarantine ({final['quarantine']}): {final['quarantine_reason']}")
    for r in final["results"]:
        would = f" (monitor: would {r['would']})" if r["would"] else ""
        lines.append(f"  {r['check']:<8} {r['result']:<9} {r['reason']}{would}")
    arc = final.get("arc")
    if isinstance(arc, dict) and arc["result"] != "none":
        sealers = ", ".join(arc["sealers"])
        line = f"arc: {arc['result']}, {arc['instances']} set(s)" + (
            f" sealed by {sealers}" if sealers else "") + (
            f", oldest-pass {arc['oldest_pass']}" if arc["oldest_pass"] is not None else "")
        if arc["dmarc_override"]:
            line += f"; DMARC failure accepted by ARC from {arc['dmarc_override']}"
        lines.append(line)
    if final["header_edits"]:
        lines.append("header edits:")
        for e in final["header_edits"]:
            where = f"[{e['index']}]" if "index" in e else ""
            value = f": {e['value']}" if "value" in e else ""
            lines.append(f"  {e['op']} {e['name']}{where}{value}")
    return "\n".join(lines) + "\n"


def cmd_keygen(args: argparse.Namespace) -> int:
    for option, name in (("--domain", args.domain), ("--selector", args.selector)):
        problem = keys.dns_name_problem(name)
        if problem:
            raise UsageError(f"{option}: {name!r} is not a DNS name: {problem}")
    try:
        key = keys.generate(domain=args.domain, selector=args.selector, kind=args.type,
                            bits=args.bits, directory=args.dir)
    except FileExistsError as exc:
        sys.stderr.write(f"mailward: {exc.filename} exists; not overwriting a key\n")
        return 1
    sys.stdout.write(f"# private key (mode 0600): {key.path}\n"
                     f"# publish this record, then add to [check.dkim_sign] keys:\n"
                     f"#   {key.domain} {key.selector} {key.path}\n"
                     f"{keys.zone_line(key)}\n")
    return 0


def _config_or_defaults(path: str) -> configmod.Config:
    if path:
        return configmod.load(path, REGISTRY)
    if os.path.exists(DEFAULT_CONFIG):
        return configmod.load(DEFAULT_CONFIG, REGISTRY)
    return configmod.loads("", REGISTRY, "<defaults>")


def cmd_keycheck(args: argparse.Namespace) -> int:
    """Compare signing keys with DNS: the configured ones, one given (the next selector, before
    the switch), or a retired selector (its record revoked or gone)."""
    cfg = _config_or_defaults(args.config)
    resolver = Resolver(cfg.dns)
    if args.retired or args.key:
        if not (args.domain and args.selector):
            raise UsageError("--key and --retired need --domain and --selector")
        for option, name in (("--domain", args.domain), ("--selector", args.selector)):
            problem = keys.dns_name_problem(name)
            if problem:
                raise UsageError(f"{option}: {name!r} is not a DNS name: {problem}")
    good = {"published", "revoked", "gone"}
    lines: list[tuple[str, str]] = []
    try:
        if args.retired:
            status = keys.retired_status(args.domain, args.selector, resolver)
            good = {"revoked", "gone"}
            lines.append((status, keys.record_name(args.domain, args.selector)))
        else:
            if args.key:
                todo = [keys.load_key(args.key, domain=args.domain, selector=args.selector)]
            else:
                todo = [k for link in cfg.chain if link.name in ("dkim_sign", "arc_seal")
                        for k in _loaded_keys(link.settings)]
                if not todo:
                    sys.stdout.write("no signing keys configured ([check.dkim_sign] keys, "
                                     "[check.arc_seal] key)\n")
                    return 0
            for key in todo:
                lines.append((keys.key_status(key, resolver),
                              f"{keys.record_name(key.domain, key.selector)} {key.path}"))
    except DnsError as exc:
        sys.stdout.write(f"error      cannot look up the record: {exc}\n")
        return 1
    for status, what in lines:
        sys.stdout.write(f"{status:<10} {what}\n")
    return 0 if all(status in good for status, _ in lines) else 1


def cmd_audit(args: argparse.Namespace) -> int:
    """Check the MTA and our domains; exit 1 when anything fails."""
    from mailward import audit  # noqa: PLC0415 - see the imports above
    cfg = _config_or_defaults(args.config)
    findings = audit.run(cfg, args.postfix_dir, with_mta=not args.no_mta)
    if args.json:
        json.dump(audit.as_json(findings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(audit.render(findings))
    return 1 if any(f.status == audit.FAIL for f in findings) else 0


def cmd_sts(args: argparse.Namespace) -> int:
    from mailward.services.metrics import StsMetrics  # noqa: PLC0415 - see the imports above
    from mailward.sts import cache as sts_cache  # noqa: PLC0415
    from mailward.sts import service as sts_service  # noqa: PLC0415
    cfg = _config_or_defaults(args.config) if args.action != "run" else \
        configmod.load(args.config or DEFAULT_CONFIG, REGISTRY)
    if args.action == "run":
        _setup_logging(cfg.sts.log_level)
        return sts_service.run(cfg.sts, cfg.dns)
    cache = sts_cache.open_cache(cfg.sts)
    if args.action == "purge":
        if args.domain:
            gone = sum(cache.delete(d.lower().rstrip(".")) for d in args.domain)
        else:
            gone = cache.purge()
        sys.stdout.write(f"{gone} cached polic{'y' if gone == 1 else 'ies'} dropped\n")
        return 0
    if not args.domain:
        entries = cache.entries()
        for e in entries:
            sys.stdout.write(sts_describe(e, time.time()) + "\n")
        if not entries:
            sys.stdout.write("the cache is empty\n")
        return 0
    service = sts_service.PolicyService(cfg.sts, Resolver(cfg.dns), cache, StsMetrics())
    status = 0
    for domain in args.domain:
        answer = service.lookup(domain, fetch=not args.cached)
        if args.json:
            data: dict[str, object] = {
                "domain": answer.domain, "answer": answer.text, "kind": answer.kind,
                "source": answer.source, "note": answer.note}
            if answer.entry is not None:
                data["policy"] = json.loads(answer.entry.to_json())
            sys.stdout.write(json.dumps(data) + "\n")
        else:
            sys.stdout.write(f"{answer.domain}: {answer.text or '(nothing: Postfix default)'}\n"
                             f"  answer: {answer.kind}, from {answer.source}"
                             + (f" ({answer.note})" if answer.note else "") + "\n")
            if answer.entry is not None:
                sys.stdout.write("  " + sts_describe(answer.entry, time.time()) + "\n")
        status = max(status, 1 if answer.kind == "temp" else 0)
    return status


def sts_describe(e: Any, now: float) -> str:
    """One cached policy (an sts.cache.Entry) on one line."""
    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))

    state = "expired" if e.expires <= now else f"expires {when(e.expires)}"
    return (f"{e.domain} mode={e.policy.mode} id={e.policy_id} mx={','.join(e.policy.mx)} "
            f"max_age={e.policy.max_age} fetched {when(e.fetched)}, {state}, checked "
            f"{when(e.checked)}" + (" dane" if e.dane else "")
            + (f"; last refresh: {e.error}" if e.error else ""))


def _loaded_keys(settings: object) -> tuple[keys.SigningKey, ...]:
    loaded = getattr(settings, "loaded", ())
    return loaded if isinstance(loaded, tuple) else (loaded,) if loaded else ()


# Loaders of sections read outside config.load (a service's own section), each called with no
# configuration: the generated reference and its test see their keys too.
REFERENCE_LOADERS: tuple[Callable[[], object], ...] = ()


def cmd_docs(args: argparse.Namespace) -> int:
    from mailward import reference  # noqa: PLC0415 - see the imports above
    from mailward.services.metrics import StsMetrics  # noqa: PLC0415
    if args.what == "metrics":
        sys.stdout.write(reference.metrics_md([Metrics(), StsMetrics()]))
        return 0
    if args.what == "man":
        sys.stdout.write(reference.man_page(build_parser(), __version__))
        return 0
    with open(args.annotated, encoding="utf-8") as fh:
        sys.stdout.write(reference.configuration_md(REGISTRY, fh.read(), REFERENCE_LOADERS))
    return 0


def _annotated_default() -> str:
    """conf/mailward.ini of a source checkout, else the installed copy."""
    here = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "mailward.ini")
    return os.path.normpath(here) if os.path.exists(here) else DEFAULT_CONFIG


def cmd_demo(args: argparse.Namespace) -> int:
    from mailward.lab.demo import main as demo_main  # noqa: PLC0415 - see the imports above

    return demo_main(keep=args.keep)


def cmd_reports(args: argparse.Namespace) -> int:
    from mailward.reports import commands as report_commands  # noqa: PLC0415 - see above
    cfg = _config_or_defaults(args.config)
    _setup_logging("warning")
    if args.action == "build":
        if args.send and args.out:
            raise UsageError("--send or --out, not both")
        return report_commands.run_build(cfg, period=args.period, out=args.out,
                                         send=args.send)
    if args.action == "ingest":
        if not args.files:
            raise UsageError("ingest: name the report files")
        return report_commands.run_ingest(cfg, args.files)
    if args.action == "html":
        if not args.out:
            raise UsageError("html: --out FILE")
        return report_commands.run_html(cfg, out=args.out, domain=args.domain,
                                        since_spec=args.since)
    return report_commands.run_show(cfg, domain=args.domain, since_spec=args.since,
                                    as_json=args.json, unauthenticated=args.unauthenticated,
                                    rejected=args.rejected)


def _add_reports_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reports", help="DMARC aggregate reports: build and send ours, ingest "
                                       "and show those sent to us")
    p.add_argument("action", choices=("build", "ingest", "show", "html"),
                   help="build: one period's reports (--send, or --out DIR); ingest FILE...: "
                        "reports fetched elsewhere (XML, gzip, zip); show: who sends as our "
                        "domains; html --out FILE: the same as a page")
    p.add_argument("files", nargs="*", help="ingest: report files")
    p.add_argument("-c", "--config", default="", help=OPTIONAL_CONFIG_HELP)
    p.add_argument("--period", default="yesterday", help="build: yesterday, today or "
                                                         "YYYY-MM-DD (UTC)")
    p.add_argument("--send", action="store_true", help="build: mail them through [reports] "
                                                       "relay")
    p.add_argument("--out", default="", help="build: a directory for the .xml.gz files; "
                                             "html: the file")
    p.add_argument("--domain", default="", help="show/html: one of our domains only")
    p.add_argument("--since", default="7d", help="show/html: 7d, 24h or YYYY-MM-DD")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--unauthenticated", action="store_true",
                   help="show: only reports whose mail did not pass DMARC (maybe forged)")
    p.add_argument("--rejected", action="store_true",
                   help="show: reports refused on arrival, with the reason")
    p.set_defaults(func=cmd_reports)


def _add_sts_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sts", help="the MTA-STS policy service for Postfix's SMTP client: "
                                   "run it, ask it, empty its cache")
    p.add_argument("action", choices=("run", "query", "purge"),
                   help="run: serve [sts] listen; query [DOMAIN...]: the answer Postfix gets "
                        "and where it comes from (no domain: list the cache); purge "
                        "[DOMAIN...]: drop cached policies (all without a domain)")
    p.add_argument("domain", nargs="*", help="query, purge: the domains (none: all)")
    p.add_argument("-c", "--config", default="", help=OPTIONAL_CONFIG_HELP)
    p.add_argument("--cached", action="store_true",
                   help="query: answer from the cache only, fetch nothing")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_sts)


CONFIG_HELP = "the configuration file"
OPTIONAL_CONFIG_HELP = "the configuration file (none: the built-in defaults)"
JSON_HELP = "print JSON, not text"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailward", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mailward {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the milter")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and print the effective one")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("scan", help="run the checks offline on a message file")
    p.add_argument("file", help="an RFC 5322 message (.eml), or - for standard input")
    p.add_argument("-c", "--config", default="", help=OPTIONAL_CONFIG_HELP)
    p.add_argument("--client-ip", default="", help="the SMTP client's IP address")
    p.add_argument("--helo", default="", help="the name it gave in HELO/EHLO")
    p.add_argument("--mail-from", default="", help="the envelope sender (MAIL FROM)")
    p.add_argument("--rcpt", action="append", help="a recipient (repeat for more)")
    p.add_argument("--tls-version", default="", choices=("", *TLS_VERSIONS),
                   help="the TLS version the MTA reported; empty means no TLS")
    p.add_argument("--auth-user", default="", help="the SASL login, for submitted mail")
    p.add_argument("--daemon-name", default="", help="the MTA's {daemon_name}")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("keygen", help="make a DKIM signing key and print its DNS record")
    p.add_argument("--domain", required=True, help="the signing domain (d=)")
    p.add_argument("--selector", required=True, help="the selector (s=)")
    p.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="the key type")
    p.add_argument("--bits", type=int, choices=(1024, 2048, 3072, 4096), default=2048,
                   help="RSA key size")
    p.add_argument("--dir", default=".", help="where to write DOMAIN.SELECTOR.key")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("keycheck", help="compare DKIM/ARC signing keys with their DNS records "
                                        "(exit 1 unless all is as it should be)")
    p.add_argument("-c", "--config", default="", help=OPTIONAL_CONFIG_HELP)
    p.add_argument("--key", default="", help="one key file (e.g. the next selector's)")
    p.add_argument("--domain", default="", help="with --key or --retired: its domain")
    p.add_argument("--selector", default="", help="with --key or --retired: its selector")
    p.add_argument("--retired", action="store_true",
                   help="check that --domain/--selector is revoked (empty p=) or gone")
    p.set_defaults(func=cmd_keycheck)

    p = sub.add_parser("audit", help="check the MTA (postconf) and [milter] local_domains "
                                     "(DNS) against good practice (exit 1 on a failure)")
    p.add_argument("-c", "--config", default="", help=OPTIONAL_CONFIG_HELP)
    p.add_argument("--postfix-dir", default="",
                   help="a Postfix configuration directory (default: postconf's own)")
    p.add_argument("--no-mta", action="store_true", help="only the domains")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_audit)

    _add_sts_parser(sub)
    _add_reports_parser(sub)

    p = sub.add_parser("docs", help="print the configuration or metrics reference "
                                    "(Markdown) or this manual page (roff), generated from "
                                    "the code")
    p.add_argument("what", choices=("config", "metrics", "man"), help="which")
    p.add_argument("--annotated", default=_annotated_default(),
                   help="the annotated INI whose comments give each key's meaning "
                        "(default: conf/mailward.ini)")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("demo", help="run a private Postfix with mailward and send samples "
                                    "(Debian, root)")
    p.add_argument("--keep", action="store_true", help="leave the lab running for a look")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MailwardError as exc:
        sys.stderr.write(f"mailward: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"mailward: {exc}\n")
        return 1
