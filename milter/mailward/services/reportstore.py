"""The report store: what aggregate reports are made of, and the reports others send us.

Three kinds of rows, in SQLite (one file, WAL, this host: the default) or PostgreSQL (a URL:
a fleet of MTAs that report as one):

- `dmarc_messages`: one row per message whose DMARC outcome was final (written after the
  verdict, so a tempfailed attempt the sender retries is counted once, when it is judged for
  good), with what RFC 9990's `record` needs;
- `ingested_reports` and `ingested_rows`: aggregate reports received about our domains,
  accepted or rejected (with the reason), and whether the report mail itself authenticated;
- `sent_reports`: each report we built and where it went, so a period is not sent twice.

The milter never waits for the database: `QueuedWriter` takes rows on a bounded queue and a
background thread writes them in batches; a full queue drops (counted), it never blocks.
Nothing here knows DMARC's rules: rows are plain data, and a TLS-RPT reporter could keep its
own in the same way (a table, a dataclass, `add_*`/query methods).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mailward.errors import MailwardError
from mailward.services import sqlitedb
from mailward.services.background import QueueThread

log = logging.getLogger("mailward.reports")


class StoreError(MailwardError):
    """The report store could not be read or written."""


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One message's final DMARC outcome (RFC 9990 `record`, before aggregation)."""

    time: int
    policy_domain: str
    header_from: str
    envelope_from: str
    source_ip: str
    disposition: str  # none, pass, quarantine, reject: what was done with the message
    dkim_aligned: str  # pass or fail
    spf_aligned: str
    reasons: tuple[tuple[str, str], ...] = ()  # (override type, comment)
    dkim: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, result)
    spf: tuple[str, str, str] = ("", "", "")  # (domain, scope, result); domain "": none
    policy: tuple[tuple[str, str], ...] = ()  # the record as published: p, sp, np, ...


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One `record` of a received aggregate report."""

    source_ip: str
    count: int
    disposition: str
    dkim_aligned: str
    spf_aligned: str
    header_from: str
    envelope_from: str = ""
    dkim: tuple[tuple[str, str, str], ...] = ()
    spf: tuple[tuple[str, str], ...] = ()  # (domain, result)
    reasons: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class IngestedReport:
    """A received aggregate report, or what is known of one that was rejected."""

    received: int
    source: str  # where it came from: a file name, or the message's queue id
    status: str  # accepted, rejected
    reason: str = ""  # why it was rejected
    authenticated: bool = False  # the report mail passed DMARC for its own From
    auth_detail: str = ""
    org_name: str = ""
    org_email: str = ""
    report_id: str = ""
    begin: int = 0
    end: int = 0
    policy_domain: str = ""
    policy: tuple[tuple[str, str], ...] = ()
    rows: tuple[ReportRow, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class SentReport:
    time: int
    policy_domain: str
    begin: int
    end: int
    report_id: str
    destination: str
    status: str  # sent, skipped, failed
    detail: str = ""


SCHEMA = """
CREATE TABLE IF NOT EXISTS dmarc_messages (
  id {serial}, time BIGINT NOT NULL, policy_domain TEXT NOT NULL, header_from TEXT NOT NULL,
  envelope_from TEXT NOT NULL, source_ip TEXT NOT NULL, disposition TEXT NOT NULL,
  dkim_aligned TEXT NOT NULL, spf_aligned TEXT NOT NULL, reasons TEXT NOT NULL,
  dkim TEXT NOT NULL, spf TEXT NOT NULL, policy TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS dmarc_messages_time ON dmarc_messages (time, policy_domain);
CREATE TABLE IF NOT EXISTS ingested_reports (
  id {serial}, received BIGINT NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL,
  reason TEXT NOT NULL, authenticated INTEGER NOT NULL, auth_detail TEXT NOT NULL,
  org_name TEXT NOT NULL, org_email TEXT NOT NULL, report_id TEXT NOT NULL,
  begin_time BIGINT NOT NULL, end_time BIGINT NOT NULL, policy_domain TEXT NOT NULL,
  policy TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS ingested_reports_id ON ingested_reports
  (org_name, report_id, policy_domain) WHERE status = 'accepted';
CREATE TABLE IF NOT EXISTS ingested_rows (
  report BIGINT NOT NULL, source_ip TEXT NOT NULL, count BIGINT NOT NULL,
  disposition TEXT NOT NULL, dkim_aligned TEXT NOT NULL, spf_aligned TEXT NOT NULL,
  header_from TEXT NOT NULL, envelope_from TEXT NOT NULL, dkim TEXT NOT NULL,
  spf TEXT NOT NULL, reasons TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ingested_rows_report ON ingested_rows (report);
CREATE TABLE IF NOT EXISTS sent_reports (
  time BIGINT NOT NULL, policy_domain TEXT NOT NULL, begin_time BIGINT NOT NULL,
  end_time BIGINT NOT NULL, report_id TEXT NOT NULL, destination TEXT NOT NULL,
  status TEXT NOT NULL, detail TEXT NOT NULL);
"""

_SCHEMA_LOCK = 0x6D61696C77617264  # "mailward": the advisory lock held while creating tables

_MESSAGE_COLUMNS = ("time, policy_domain, header_from, envelope_from, source_ip, disposition, "
                    "dkim_aligned, spf_aligned, reasons, dkim, spf, policy")


def _tuples(value: Any, width: int) -> tuple[Any, ...]:
    """JSON lists of lists back into tuples of `width` strings (anything else: a StoreError)."""
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != width:
            raise StoreError("malformed row in the report store")
        out.append(tuple(str(x) for x in item))
    return tuple(out)


def _triple(value: Any) -> tuple[str, str, str]:
    if not isinstance(value, list) or len(value) != 3:
        raise StoreError("malformed row in the report store")
    return str(value[0]), str(value[1]), str(value[2])


class SqlStore:
    """The queries, for both databases; subclasses connect and say how parameters look."""

    placeholder = "?"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def _cursor(self, *, schema: bool = False) -> Iterator[Any]:
        """A transaction, committed at the end; with `schema`, no other connection creates
        tables until it ends."""
        raise NotImplementedError
        yield

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.placeholder)

    def _run(self, sql: str, args: Sequence[Any] = (), *,
             many: Sequence[Sequence[Any]] | None = None) -> list[Any]:
        if many is not None and not many:
            return []
        refused: tuple[type[Exception], ...] = (*self.errors, UnicodeError)
        try:
            with self._lock, self._cursor() as cur:
                if many is not None:
                    cur.executemany(self._sql(sql), many)
                    return []
                cur.execute(self._sql(sql), args)
                return list(cur.fetchall()) if cur.description else [cur.rowcount]
        except refused as exc:  # UnicodeError: text the database cannot encode
            raise StoreError(f"report store: {type(exc).__name__}: {exc}") from None

    def create(self) -> None:
        """The tables, in one transaction: several MTAs of a fleet (or the milter and the
        daily `reports build`) may open a new database at the same moment."""
        statements = [s for s in SCHEMA.format(serial=self.serial).split(";") if s.strip()]
        try:
            with self._lock, self._cursor(schema=True) as cur:
                for statement in statements:
                    cur.execute(statement)
        except self.errors as exc:
            raise StoreError(f"report store: {type(exc).__name__}: {exc}") from None

    # -- messages (what we report) --------------------------------------------------------

    def add_messages(self, rows: Sequence[MessageRecord]) -> None:
        if not rows:
            return
        self._run(f"INSERT INTO dmarc_messages ({_MESSAGE_COLUMNS}) VALUES "  # noqa: S608
                  "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", many=[(
                      r.time, r.policy_domain, r.header_from, r.envelope_from, r.source_ip,
                      r.disposition, r.dkim_aligned, r.spf_aligned, json.dumps(r.reasons),
                      json.dumps(r.dkim), json.dumps(r.spf), json.dumps(r.policy))
                      for r in rows])

    def messages(self, begin: int, end: int, *, policy_domain: str = "") -> list[MessageRecord]:
        """Messages judged in [begin, end), oldest first; of one DMARC Policy Domain if given."""
        where, args = "time >= ? AND time < ?", list[Any]([begin, end])
        if policy_domain:
            where, args = where + " AND policy_domain = ?", [*args, policy_domain]
        rows = self._run(f"SELECT {_MESSAGE_COLUMNS} FROM dmarc_messages "  # noqa: S608
                         f"WHERE {where} ORDER BY time, id", args)
        try:
            return [MessageRecord(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                                  _tuples(json.loads(r[8]), 2), _tuples(json.loads(r[9]), 3),
                                  _triple(json.loads(r[10])),
                                  _tuples(json.loads(r[11]), 2)) for r in rows]
        except (ValueError, TypeError) as exc:
            raise StoreError(f"malformed row in the report store: {exc}") from None

    # -- reports received -----------------------------------------------------------------

    def add_report(self, report: IngestedReport) -> bool:
        """Store a received report; False when the same report (reporting organisation,
        report id and domain) was accepted before, as RFC 9990 lets a sender resend."""
        if report.status == "accepted" and self._run(
                "SELECT 1 FROM ingested_reports WHERE org_name = ? AND report_id = ? AND "
                "policy_domain = ? AND status = 'accepted'",
                (report.org_name, report.report_id, report.policy_domain)):
            return False
        values = (report.received, report.source, report.status, report.reason,
                  int(report.authenticated), report.auth_detail, report.org_name,
                  report.org_email, report.report_id, report.begin, report.end,
                  report.policy_domain, json.dumps(report.policy))
        sql = ("INSERT INTO ingested_reports (received, source, status, reason, authenticated, "
               "auth_detail, org_name, org_email, report_id, begin_time, end_time, "
               "policy_domain, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        report_key = self._insert_id(sql, values)
        self._run("INSERT INTO ingested_rows (report, source_ip, count, disposition, "
                  "dkim_aligned, spf_aligned, header_from, envelope_from, dkim, spf, reasons) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", many=[(
                      report_key, r.source_ip, r.count, r.disposition, r.dkim_aligned,
                      r.spf_aligned, r.header_from, r.envelope_from, json.dumps(r.dkim),
                      json.dumps(r.spf), json.dumps(r.reasons)) for r in report.rows])
        return True

    def _insert_id(self, sql: str, values: Sequence[Any]) -> int:
        raise NotImplementedError

    def reports(self, since: int, *, status: str = "accepted") -> list[IngestedReport]:
        """Reports received since `since` (epoch seconds) with that status, rows included."""
        heads = self._run("SELECT id, received, source, status, reason, authenticated, "
                          "auth_detail, org_name, org_email, report_id, begin_time, end_time, "
                          "policy_domain, policy FROM ingested_reports WHERE received >= ? "
                          "AND status = ? ORDER BY received, id", (since, status))
        out = []
        for h in heads:
            rows = self._run("SELECT source_ip, count, disposition, dkim_aligned, spf_aligned, "
                             "header_from, envelope_from, dkim, spf, reasons FROM ingested_rows "
                             "WHERE report = ?", (h[0],))
            try:
                out.append(IngestedReport(
                    int(h[1]), h[2], h[3], h[4], bool(h[5]), h[6], h[7], h[8], h[9], int(h[10]),
                    int(h[11]), h[12], _tuples(json.loads(h[13]), 2), tuple(
                        ReportRow(r[0], int(r[1]), r[2], r[3], r[4], r[5], r[6],
                                  _tuples(json.loads(r[7]), 3), _tuples(json.loads(r[8]), 2),
                                  _tuples(json.loads(r[9]), 2)) for r in rows)))
            except (ValueError, TypeError) as exc:
                raise StoreError(f"malformed row in the report store: {exc}") from None
        return out

    # -- reports sent ---------------------------------------------------------------------

    def add_sent(self, sent: SentReport) -> None:
        self._run("INSERT INTO sent_reports (time, policy_domain, begin_time, end_time, "
                  "report_id, destination, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (sent.time, sent.policy_domain, sent.begin, sent.end, sent.report_id,
                   sent.destination, sent.status, sent.detail))

    def sent(self, policy_domain: str, begin: int, end: int) -> list[SentReport]:
        rows = self._run("SELECT time, policy_domain, begin_time, end_time, report_id, "
                         "destination, status, detail FROM sent_reports WHERE policy_domain = ? "
                         "AND begin_time = ? AND end_time = ?", (policy_domain, begin, end))
        return [SentReport(int(r[0]), r[1], int(r[2]), int(r[3]), r[4], r[5], r[6], r[7])
                for r in rows]

    def sent_counts(self) -> tuple[int, dict[str, int]]:
        """Reports built (distinct domain and period) and deliveries by status, kept now."""
        built = self._run("SELECT COUNT(*) FROM (SELECT DISTINCT policy_domain, begin_time "
                          "FROM sent_reports) AS built")
        by_status = self._run("SELECT status, COUNT(*) FROM sent_reports GROUP BY status")
        return int(built[0][0]), {str(k): int(n) for k, n in by_status}

    # -- retention ------------------------------------------------------------------------

    def prune(self, before: int) -> int:
        """Drop what is older than `before` (epoch seconds); how many rows went."""
        gone = int(self._run("DELETE FROM dmarc_messages WHERE time < ?", (before,))[0])
        self._run("DELETE FROM ingested_rows WHERE report IN (SELECT id FROM ingested_reports "
                  "WHERE received < ?)", (before,))
        gone += int(self._run("DELETE FROM ingested_reports WHERE received < ?", (before,))[0])
        gone += int(self._run("DELETE FROM sent_reports WHERE time < ?", (before,))[0])
        return gone

    def close(self) -> None:
        pass


class SqliteStore(SqlStore):
    errors = (sqlite3.Error,)

    def __init__(self, path: str, *, cache_kib: int = 0) -> None:
        """`cache_kib`: SQLite's page cache, if not its default of 2,000 KiB (the milter,
        which only appends rows, keeps 256: 1.8 MiB less resident after 20,000 rows)."""
        super().__init__()
        try:
            self._db = sqlitedb.connect(path)
            if cache_kib:
                self._db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from None
        self.create()

    @contextmanager
    def _cursor(self, *, schema: bool = False) -> Iterator[Any]:
        cur = self._db.cursor()
        try:
            # the tables: the write lock first (waiting up to the timeout), not after reading
            cur.execute("BEGIN IMMEDIATE" if schema else "BEGIN")
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.rollback()
            raise
        finally:
            cur.close()

    def _insert_id(self, sql: str, values: Sequence[Any]) -> int:
        try:
            with self._lock, self._cursor() as cur:
                cur.execute(sql, values)
                return int(cur.lastrowid or 0)
        except sqlite3.Error as exc:
            raise StoreError(f"report store: {exc}") from None

    def close(self) -> None:
        self._db.close()


class PostgresStore(SqlStore):
    placeholder = "%s"
    serial = "BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg  # noqa: PLC0415 - the optional extra mailward[postgresql]
        except ImportError:
            raise StoreError("postgresql_url is set but psycopg 3 is not installed "
                             "(Debian: python3-psycopg; pip: mailward[postgresql])") from None
        self.errors = (psycopg.Error,)
        def connect() -> Any:
            return psycopg.connect(url, autocommit=False, connect_timeout=10)

        self._connect = connect
        try:
            self._db = self._connect()
        except psycopg.Error as exc:
            raise StoreError(f"postgresql: {type(exc).__name__}: {exc}") from None
        self.create()

    @contextmanager
    def _cursor(self, *, schema: bool = False) -> Iterator[Any]:
        if self._db.closed or self._db.broken:  # the server restarted: connect again
            self._db = self._connect()
        try:
            with self._db.cursor() as cur:
                if schema:
                    # CREATE ... IF NOT EXISTS is not safe against a concurrent CREATE in
                    # PostgreSQL (a unique violation in its catalogue): one at a time
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                yield cur
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise

    def _insert_id(self, sql: str, values: Sequence[Any]) -> int:
        rows = self._run(sql + " RETURNING id", values)
        return int(rows[0][0])

    def close(self) -> None:
        self._db.close()


def open_store(kind: str, *, sqlite_path: str = "", postgresql_url: str = "",
               sqlite_cache_kib: int = 0) -> SqlStore:
    if kind == "postgresql":
        return PostgresStore(postgresql_url)
    return SqliteStore(sqlite_path, cache_kib=sqlite_cache_kib)


class QueuedWriter(QueueThread[MessageRecord]):
    """Rows from the milter's threads, written by one background thread in batches.

    `put` never blocks and never raises: with the queue full (the database stalled) the row is
    dropped and `on_drop` counts it. Retention is applied once an hour.

    After the first row of a batch the thread waits `linger` seconds for more before it
    writes: at hundreds of messages a second that is one wake-up and one transaction per
    batch, not per message (0.25 s: rows are read by `reports build` a day later)."""

    def __init__(self, store: SqlStore, *, retention_days: int, maxsize: int = 20000,
                 batch: int = 500, linger: float = 0.25,
                 on_drop: Callable[[], None] = lambda: None,
                 on_error: Callable[[], None] = lambda: None) -> None:
        super().__init__("report-writer", maxsize)
        self.store = store
        self.retention = retention_days * 86400
        self._batch = batch
        self._linger = linger
        self._on_drop, self._on_error = on_drop, on_error
        self._start()

    def put(self, row: MessageRecord) -> None:
        if not self.offer(row):
            self._on_drop()

    def _run(self) -> None:
        next_prune = 0.0
        while True:
            first = self._queue.get()
            rows = [first] if first is not None else []
            stop = first is None
            if not stop and self._linger and self._queue.qsize() < self._batch:
                time.sleep(self._linger)  # the milter's puts meanwhile wake nobody
            while not stop and len(rows) < self._batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    rows.append(item)
            try:
                self._write(rows)
                if time.monotonic() >= next_prune:
                    self.store.prune(int(time.time()) - self.retention)
                    next_prune = time.monotonic() + 3600
            except StoreError as exc:
                log.error("report store: %s", exc)
                self._on_error()
            except Exception:  # a bug must not end the thread: later rows would all drop
                log.exception("report store: %d row(s) not written", len(rows))
                self._on_error()
            if stop:
                return

    def _write(self, rows: list[MessageRecord]) -> None:
        """The batch; if the database refuses it, each row alone, so that one row it cannot
        take (text it cannot encode, say) costs only itself."""
        try:
            self.store.add_messages(rows)
            return
        except StoreError as exc:
            if len(rows) == 1:
                raise
            log.warning("report store: a batch of %d refused (%s): writing one by one",
                        len(rows), exc)
        for row in rows:
            try:
                self.store.add_messages([row])
            except StoreError as exc:
                log.error("report store: a row not written: %s", exc)
                self._on_error()

