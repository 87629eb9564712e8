"""Taking in the aggregate reports others send about our domains.

`ingest_message` (report mail, as the milter sees it pass to an `ingest_addresses` mailbox)
and `ingest_file` (`mailward reports ingest FILE...`) parse what they are given and store it,
accepted or rejected with the reason; they never raise for bad input. `Inbox` does the same
for the milter on a background thread, so ordinary mail never waits for it.

Anyone can mail a forged report to a published `rua` address, hoping an administrator will
add the attacker's address to SPF. So a report counts as authenticated only when its mail
passed DMARC for a domain of the organisation the report names (a file given by the
administrator counts as such), and `show` keeps the others apart.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailward.reports.aggregate import ReportError, parse
from mailward.reports.build import org_domain
from mailward.reports.unpack import Bomb, attachments, xml_of
from mailward.services.background import QueueThread
from mailward.services.reportstore import IngestedReport, SqlStore, StoreError

log = logging.getLogger("mailward.reports")


@dataclass(frozen=True)
class Limits:
    size: int  # bytes of XML after decompression
    records: int


def _store(store: SqlStore, report: IngestedReport) -> str:
    """accepted, duplicate or rejected (as stored)."""
    if report.status == "rejected":
        store.add_report(report)
        return "rejected"
    return "accepted" if store.add_report(report) else "duplicate"


def _rejected(reason: str, *, source: str, authenticated: bool, detail: str,
              now: int) -> IngestedReport:
    return IngestedReport(received=now, source=source, status="rejected", reason=reason[:300],
                          authenticated=authenticated, auth_detail=detail)


def speaks_for(sender_domain: str, report: IngestedReport) -> bool:
    """Does mail from `sender_domain` speak for the organisation the report names (its
    org_name, or its contact address's domain, in the same Organizational Domain)?"""
    mine = org_domain(sender_domain)
    claimed = {report.org_name, report.org_email.rpartition("@")[2]} - {""}
    return any(org_domain(c) == mine for c in claimed)


def _outcome(xml: bytes, limits: Limits, *, source: str, authenticated: bool, detail: str,
             now: int, sender_domain: str = "") -> IngestedReport:
    try:
        report = parse(xml, max_records=limits.records)
    except ReportError as exc:
        return _rejected(str(exc), source=source, authenticated=authenticated, detail=detail,
                         now=now)
    if authenticated and sender_domain and not speaks_for(sender_domain, report):
        # DMARC proves who sent the mail, not the organisation the report claims to be
        authenticated = False
        detail += f"; {sender_domain} does not speak for {report.org_name}"
    return dataclasses.replace(report, received=now, source=source,
                               authenticated=authenticated, auth_detail=detail)


def ingest_message(store: SqlStore, raw: bytes, limits: Limits, *, source: str,
                   authenticated: bool, detail: str, sender_domain: str = "") -> list[str]:
    """Store each report attached to `raw`; the outcome of each (accepted, duplicate,
    rejected, bomb)."""
    now = int(time.time())
    try:
        found = attachments(raw, limits.size)
    except ReportError as exc:
        _store(store, _rejected(str(exc), source=source, authenticated=authenticated,
                                detail=detail, now=now))
        return ["bomb" if isinstance(exc, Bomb) else "rejected"]
    return [_store(store, _outcome(xml, limits, source=f"{source} {name}".strip(),
                                   authenticated=authenticated, detail=detail, now=now,
                                   sender_domain=sender_domain))
            for name, xml in found]


def ingest_file(store: SqlStore, data: bytes, limits: Limits, *, source: str) -> str:
    """Store the report in a file (XML, gzip or zip) an administrator fetched elsewhere."""
    now = int(time.time())
    detail = "file given to mailward reports ingest"
    try:
        xml = xml_of(data, limits.size)
    except ReportError as exc:
        _store(store, _rejected(str(exc), source=source, authenticated=True, detail=detail,
                                now=now))
        return "bomb" if isinstance(exc, Bomb) else "rejected"
    return _store(store, _outcome(xml, limits, source=source, authenticated=True,
                                  detail=detail, now=now))


class Inbox(QueueThread[tuple[bytes, str, bool, str, str]]):
    """Report mail handed over by the milter, ingested on a background thread. `submit`
    never blocks or raises: past `maxsize` waiting messages, the message is not ingested
    (it is still delivered) and `count("dropped")` says so."""

    def __init__(self, store: SqlStore, limits: Limits, *,
                 count: Callable[[str], None] = lambda outcome: None,
                 maxsize: int = 100) -> None:
        super().__init__("report-inbox", maxsize)
        self.store, self.limits, self.count = store, limits, count
        self._start()

    def submit(self, raw: bytes, *, source: str, authenticated: bool, detail: str,
               sender_domain: str = "") -> None:
        if not self.offer((raw, source, authenticated, detail, sender_domain)):
            log.warning("report inbox full: report mail %s not ingested", source)
            self.count("dropped")

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            raw, source, authenticated, detail, sender_domain = item
            try:
                outcomes = ingest_message(self.store, raw, self.limits, source=source,
                                          authenticated=authenticated, detail=detail,
                                          sender_domain=sender_domain)
            except StoreError as exc:
                log.error("report inbox: %s not stored: %s", source, exc)
                outcomes = ["error"]
            except Exception:
                log.exception("report inbox: %s", source)
                outcomes = ["error"]
            for outcome in outcomes:
                self.count(outcome)
            log.info("report mail %s (authenticated=%s): %s", source,
                     "yes" if authenticated else "no", ", ".join(outcomes))
