"""What the milter does for reports, as the adapter's `ReportHooks`: record each message's
final DMARC outcome (queued, written in batches), and hand report mail for our
`ingest_addresses` to the inbox (a background thread). Neither ever delays or fails a message.

Report mail is never itself recorded: neither a report sent to us (to `ingest_addresses`) nor
our own (from `[reports] sender`, should it pass through this milter), so no two reporters
can feed each other reports about reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily

from mailward.core.outcomes import DmarcOutcome
from mailward.core.reporting import message_record
from mailward.core.settings import ReportsSettings, ReportStoreKind
from mailward.core.transaction import Transaction
from mailward.core.verdict import Result, Verdict
from mailward.services.metrics import Metrics
from mailward.services.reportstore import QueuedWriter, SqlStore, StoreError, open_store

if TYPE_CHECKING:
    from mailward.reports.ingest import Inbox

SENT_STATUSES = ("sent", "failed", "skipped")
MILTER_CACHE_KIB = 256  # the milter appends rows and reads little: a small SQLite page cache

log = logging.getLogger("mailward.reports")


class Reporting:
    """The store, its writer and the inbox, opened at start. A store that cannot be opened
    then (the database of a fleet down, a directory missing) is tried again every
    `retry_interval` seconds in the background; until it opens, outcomes are counted as
    dropped and report mail is delivered unread, and mail is never held up for it."""

    def __init__(self, settings: ReportsSettings, metrics: Metrics, *,
                 retry_interval: float = 60.0) -> None:
        self.settings = settings
        self._metrics = metrics
        self.addresses = frozenset(settings.ingest_addresses)
        self.store: SqlStore | None = None
        self.writer: QueuedWriter | None = None
        self.inbox: Inbox | None = None
        self._collector: SentCollector | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        try:
            self._open()
        except StoreError as exc:
            log.error("[reports] %s: DMARC outcomes are not recorded and report mail is not "
                      "read until the store opens (tried again every %gs)", exc,
                      retry_interval)
            metrics.report_rows.labels(outcome="error").inc()
            threading.Thread(target=self._retry, args=(retry_interval,), name="report-store",
                             daemon=True).start()

    def _open(self) -> None:
        s, metrics = self.settings, self._metrics
        store = open_store(str(s.store), sqlite_path=s.sqlite_path,
                           postgresql_url=s.postgresql_url, sqlite_cache_kib=MILTER_CACHE_KIB)
        writer = QueuedWriter(
            store, retention_days=s.retention,
            on_drop=lambda: metrics.report_rows.labels(outcome="dropped").inc(),
            on_error=lambda: metrics.report_rows.labels(outcome="error").inc())
        inbox = None
        if self.addresses:  # the XML, zip and MIME machinery is loaded only to be used
            from mailward.reports.ingest import Inbox, Limits  # noqa: PLC0415

            inbox = Inbox(store, Limits(s.max_ingest_size, s.max_report_records),
                          count=lambda outcome: metrics.reports_ingested.labels(
                              outcome=outcome).inc())
        collector = SentCollector(store)
        metrics.registry.register(collector)
        with self._lock:
            self.store, self.writer, self.inbox, self._collector = (store, writer, inbox,
                                                                    collector)

    def _retry(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self._open()
            except StoreError as exc:
                log.error("[reports] still cannot open the store: %s", exc)
                continue
            log.info("[reports] store open: DMARC outcomes are recorded from now on")
            return

    @classmethod
    def start(cls, settings: ReportsSettings, metrics: Metrics) -> Reporting | None:
        return None if settings.store is ReportStoreKind.OFF else cls(settings, metrics)

    def wants(self, tx: Transaction) -> bool:
        """Is this mail for one of our report mailboxes?"""
        return bool(self.addresses) and any(r.lower() in self.addresses for r in tx.recipients)

    def judged(self, tx: Transaction, verdict: Verdict) -> None:
        if self.wants(tx) or (self.settings.sender
                              and tx.mail_from.lower() == self.settings.sender):
            return
        row = message_record(tx, verdict, int(time.time()))
        if row is None:
            return
        if self.writer is None:  # the store is not open (yet)
            self._metrics.report_rows.labels(outcome="dropped").inc()
            return
        self.writer.put(row)
        self._metrics.report_rows.labels(outcome="queued").inc()

    def received(self, tx: Transaction, verdict: Verdict, raw: bytes) -> None:
        if self.inbox is None:  # the store is not open (yet): delivered unread
            self._metrics.reports_ingested.labels(outcome="dropped").inc()
            return
        dmarc = next((r.outcome for r in verdict.results
                      if isinstance(r.outcome, DmarcOutcome)), None)
        authenticated = dmarc is not None and dmarc.result is Result.PASS
        detail = (f"dmarc={dmarc.result} header.from={dmarc.author_domain}" if dmarc
                  else "no DMARC result")
        self.inbox.submit(raw, source=f"qid={tx.queue_id}", authenticated=authenticated,
                          detail=detail, sender_domain=dmarc.author_domain if dmarc else "")

    @property
    def max_message(self) -> int:
        """Report mail larger than this is not read (the size before decompression)."""
        return self.settings.max_ingest_size

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._collector is not None:
                self._metrics.registry.unregister(self._collector)
            if self.writer is not None:
                self.writer.close()
            if self.inbox is not None:
                self.inbox.close()
            if self.store is not None:
                self.store.close()


class SentCollector:
    """`mailward reports build --send` runs from a timer, not in this process: what it did is
    read from the store when Prometheus scrapes (within [reports] retention)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # collected on demand only: no database query at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            built, by_status = self.store.sent_counts()
        except StoreError as exc:
            log.error("report store: %s", exc)
            return
        generated = GaugeMetricFamily(
            "mailward_reports_generated", "Aggregate reports built for sending (a Policy "
            "Domain and a period each), within [reports] retention.")
        generated.add_metric([], built)
        yield generated
        sent = GaugeMetricFamily(
            "mailward_reports_sent", "Deliveries of our aggregate reports by status: sent, "
            "failed (the relay refused or was unreachable), skipped (a destination not "
            "verified or not mailto:, or a report too large), within [reports] retention.",
            labels=["status"])
        for status in SENT_STATUSES:
            sent.add_metric([status], by_status.get(status, 0))
        yield sent
