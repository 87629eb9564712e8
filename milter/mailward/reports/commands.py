"""`mailward reports build|ingest|show|html`: the command-line side of reports."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from mailward.core.config import Config
from mailward.errors import MailwardError
from mailward.reports import build as buildmod
from mailward.reports import show as showmod
from mailward.reports.ingest import Limits, ingest_file
from mailward.reports.send import SendError, deliver, message
from mailward.services.dns import Resolver
from mailward.services.keys import SigningKey
from mailward.services.reportstore import SentReport, SqlStore, open_store

log = logging.getLogger("mailward.reports")


def store_of(cfg: Config) -> SqlStore:
    r = cfg.reports
    if str(r.store) == "off":
        raise MailwardError("[reports] store = off: there is no report store")
    return open_store(str(r.store), sqlite_path=r.sqlite_path, postgresql_url=r.postgresql_url)


def signing_key(cfg: Config, domain: str) -> SigningKey | None:
    for link in cfg.chain:
        if link.name == "dkim_sign":
            for key in getattr(link.settings, "loaded", ()):
                if key.domain == domain:
                    return key  # type: ignore[no-any-return]
    return None


def since(spec: str, now: float | None = None) -> int:
    """`7d`, `24h`, `30m` ago, or a date `YYYY-MM-DD`, as epoch seconds."""
    now = time.time() if now is None else now
    units = {"d": 86400, "h": 3600, "m": 60}
    if spec[:-1].isdigit() and spec[-1:] in units:
        return int(now) - int(spec[:-1]) * units[spec[-1]]
    try:
        return buildmod.period(spec, now)[0]
    except ValueError:
        raise MailwardError(f"--since {spec!r}: expected 7d, 24h, 30m or YYYY-MM-DD"
                            ) from None


def _sender_key(cfg: Config) -> tuple[str, SigningKey]:
    sender = cfg.reports.sender
    if not sender:
        raise MailwardError("[reports] sender: needed to send reports (an address of a "
                            "domain with a [check.dkim_sign] key)")
    key = signing_key(cfg, sender.rpartition("@")[2])
    if key is None:
        raise MailwardError(f"no [check.dkim_sign] key for {sender.rpartition('@')[2]}: "
                            "report mail must pass DMARC (RFC 9990 §2.5.1)")
    return sender, key


def run_build(cfg: Config, *, period: str, out: str, send: bool,
              out_stream: TextIO = sys.stdout) -> int:
    r = cfg.reports
    org = r.org_name or cfg.milter.authserv_id
    sender, key = _sender_key(cfg) if send else (r.sender, None)
    try:
        begin, end = buildmod.period(period)
    except ValueError as exc:
        raise MailwardError(str(exc)) from None
    store = store_of(cfg)
    built = buildmod.build(store, org_name=org, email=r.contact or sender or f"postmaster@{org}",
                           begin=begin, end=end, resolver=Resolver(cfg.dns),
                           max_size=r.max_report_size)
    failed = 0
    for b in built:
        out_stream.write(f"{b.filename}: {b.report.messages} message(s), "
                         f"{len(b.report.rows)} record(s)"
                         + (f"; not sent: {b.problem}" if b.problem else "") + "\n")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / b.filename).write_bytes(b.gz)
        if send:
            failed += _send(cfg, store, b, sender=sender, key=key, out_stream=out_stream)
    if not built:
        out_stream.write("no DMARC outcomes recorded in this period\n")
    store.prune(int(time.time()) - r.retention * 86400)
    store.close()
    return 1 if failed else 0


def _send(cfg: Config, store: SqlStore, b: buildmod.Built, *, sender: str,
          key: SigningKey | None, out_stream: TextIO) -> int:
    """Mail one report to each of its destinations; how many deliveries failed. A rerun
    sends only what was not sent, and records a skip once."""
    before = {(s.destination, s.status)
              for s in store.sent(b.report.policy_domain, b.report.begin, b.report.end)}
    if b.problem:
        if ("-", "skipped") not in before:
            _record(store, b, "-", "skipped", b.problem)
        return 0
    failed = 0
    for d in b.destinations:
        if d.problem:
            log.warning("report %s: %s skipped: %s", b.filename, d.uri, d.problem)
            out_stream.write(f"  {d.uri}: skipped: {d.problem}\n")
            if (d.uri, "skipped") not in before:
                _record(store, b, d.uri, "skipped", d.problem)
        elif (d.address, "sent") in before:
            out_stream.write(f"  {d.address}: already sent\n")
        else:
            try:
                detail = deliver(cfg.reports, sender, d.address,
                                 message(b, sender=sender, to=d.address, key=key))
            except SendError as exc:
                failed += 1
                log.error("report %s to %s: %s", b.filename, d.address, exc)
                out_stream.write(f"  {d.address}: failed: {exc}\n")
                _record(store, b, d.address, "failed", str(exc))
                continue
            out_stream.write(f"  {d.address}: sent ({detail})\n")
            _record(store, b, d.address, "sent", detail)
    return failed


def _record(store: SqlStore, b: buildmod.Built, destination: str, status: str,
            detail: str) -> None:
    store.add_sent(SentReport(int(time.time()), b.report.policy_domain, b.report.begin,
                              b.report.end, b.report.report_id, destination, status,
                              detail[:300]))


def run_ingest(cfg: Config, files: list[str], *, out_stream: TextIO = sys.stdout) -> int:
    store = store_of(cfg)
    limits = Limits(cfg.reports.max_ingest_size, cfg.reports.max_report_records)
    bad = 0
    for name in files:
        try:
            size = os.path.getsize(name)
            if size > cfg.reports.max_ingest_size:
                outcome = "rejected (file larger than max_ingest_size)"
            else:
                with open(name, "rb") as fh:
                    outcome = ingest_file(store, fh.read(), limits,
                                          source=os.path.basename(name))
        except OSError as exc:
            outcome = f"unreadable ({exc.strerror})"
        bad += outcome not in ("accepted", "duplicate")
        out_stream.write(f"{name}: {outcome}\n")
    store.close()
    return 1 if bad else 0


def run_show(cfg: Config, *, domain: str, since_spec: str, as_json: bool,
             unauthenticated: bool, rejected: bool, out_stream: TextIO = sys.stdout) -> int:
    store = store_of(cfg)
    start = since(since_spec)
    if rejected:
        refused = store.reports(start, status="rejected")
        if as_json:
            json.dump([{"received": r.received, "source": r.source, "reason": r.reason,
                        "authenticated": r.authenticated} for r in refused], out_stream,
                      indent=2)
            out_stream.write("\n")
        for r in ([] if as_json else refused):
            out_stream.write(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.received))} "
                             f"{r.source}: {r.reason}\n")
        store.close()
        return 0
    reports = store.reports(start)
    chosen = showmod.select(reports, domain=domain, authenticated=not unauthenticated)
    found = showmod.sources(chosen)
    if as_json:
        json.dump([s.as_dict() for s in found], out_stream, indent=2)
        out_stream.write("\n")
    else:
        if unauthenticated:
            out_stream.write("reports whose mail did NOT pass DMARC (possibly forged):\n")
        out_stream.write(showmod.table(found))
        hidden = len(showmod.select(reports, domain=domain, authenticated=unauthenticated))
        if hidden and not unauthenticated:
            out_stream.write(f"({hidden} report(s) whose mail did not authenticate are not "
                             "shown: --unauthenticated)\n")
    store.close()
    return 0


def run_html(cfg: Config, *, out: str, domain: str, since_spec: str) -> int:
    store = store_of(cfg)
    reports = showmod.select(store.reports(since(since_spec)), domain=domain)
    store.close()
    found = showmod.sources(reports)
    total = sum(s.messages for s in found)
    title = domain or ", ".join(cfg.milter.local_domains) or "our domains"
    summary = (f"{len(reports)} authenticated report(s) since {since_spec}: {total} "
               f"message(s) from {len(found)} source(s).")
    Path(out).write_text(showmod.page(found, showmod.daily(reports), title=title,
                                      summary=summary), encoding="utf-8")
    return 0
