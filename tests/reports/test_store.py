"""The report store, the same tests against SQLite and a real PostgreSQL, and the queued
writer the milter uses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailward.services.reportstore import (
    IngestedReport,
    MessageRecord,
    PostgresStore,
    QueuedWriter,
    ReportRow,
    SentReport,
    SqliteStore,
    SqlStore,
    StoreError,
    open_store,
)


def message(n: int = 0, **changes: object) -> MessageRecord:
    values: dict[str, object] = dict(
        time=1_800_000_000 + n, policy_domain="example.org", header_from="example.org",
        envelope_from="bounce.example.org", source_ip="192.0.2.1", disposition="none",
        dkim_aligned="pass", spf_aligned="fail",
        reasons=(("local_policy", "monitor mode: would reject"),),
        dkim=(("example.org", "s1", "pass"), ("other.example", "x", "fail")),
        spf=("bounce.example.org", "mailfrom", "pass"),
        policy=(("p", "reject"), ("adkim", "r"), ("rua", "mailto:d@example.org")))
    values.update(changes)
    return MessageRecord(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgresql_url")
        found = open_store("postgresql", postgresql_url=url)
        found._run("TRUNCATE dmarc_messages, ingested_reports, ingested_rows, sent_reports")
    else:
        found = open_store("sqlite", sqlite_path=str(tmp_path / "reports.sqlite"))
    yield found
    found.close()


def test_messages_round_trip_by_period(store: SqlStore) -> None:
    rows = [message(i) for i in range(5)] + [message(100, header_from="b.example.org")]
    store.add_messages(rows)
    assert store.messages(1_800_000_000, 1_800_000_005) == rows[:5]
    assert store.messages(1_800_000_005, 1_800_001_000) == rows[5:]
    assert store.messages(0, 1) == []


def test_messages_of_one_policy_domain(store: SqlStore) -> None:
    rows = [message(0), message(1, policy_domain="other.example"), message(2)]
    store.add_messages(rows)
    assert store.messages(0, 2**40, policy_domain="example.org") == [rows[0], rows[2]]
    assert store.messages(0, 2**40, policy_domain="other.example") == [rows[1]]
    assert store.messages(0, 2**40, policy_domain="nobody.example") == []
    assert store.messages(0, 2, policy_domain="example.org") == []


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, where) of a database with no tables yet."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "fresh.sqlite")
        return
    import psycopg  # noqa: PLC0415 - the optional extra, as in the store

    url = request.getfixturevalue("postgresql_url")
    name = f"fresh{time.monotonic_ns()}"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    yield "postgresql", url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_many_open_a_new_database_at_once(fresh: tuple[str, str]) -> None:
    """A fleet starting together (or the milter and the daily build) on a new database: each
    one creates the tables, none fails (PostgreSQL raised UniqueViolation before)."""
    kind, where = fresh
    start = threading.Barrier(8)
    opened: list[SqlStore] = []
    failed: list[str] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(open_store(kind, sqlite_path=where, postgresql_url=where))
        except StoreError as exc:
            failed.append(str(exc))

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    for n, one in enumerate(opened):
        one.add_messages([message(n)])
    assert len(opened[0].messages(0, 2**40)) == 8
    for one in opened:
        one.close()


def test_reports_received_dedupe_and_keep_rejected(store: SqlStore) -> None:
    report = IngestedReport(
        received=1_800_000_000, source="qid=ABC r.xml.gz", status="accepted",
        authenticated=True, auth_detail="dmarc=pass header.from=google.com",
        org_name="google.com", org_email="noreply@google.com", report_id="123",
        begin=1_799_900_000, end=1_799_986_399, policy_domain="example.org",
        policy=(("p", "reject"),),
        rows=(ReportRow("192.0.2.7", 12, "none", "pass", "pass", "example.org",
                        "example.org", (("example.org", "s1", "pass"),),
                        (("example.org", "pass"),)),
              ReportRow("198.51.100.9", 3, "reject", "fail", "fail", "example.org",
                        reasons=(("other", "x"),))))
    assert store.add_report(report) is True
    assert store.add_report(report) is False  # the same report, sent again
    rejected = IngestedReport(received=1_800_000_001, source="qid=DEF", status="rejected",
                              reason="gzip expands past 1000 bytes")
    assert store.add_report(rejected) is True
    assert store.add_report(rejected) is True  # every rejection is kept
    assert store.reports(0) == [report]
    assert store.reports(0, status="rejected") == [rejected, rejected]
    assert store.reports(1_800_000_001) == []


def test_sent_reports_and_retention(store: SqlStore) -> None:
    sent = SentReport(1_800_000_000, "example.org", 1, 2, "id1", "mailto:d@example.org",
                      "sent", "250 ok")
    store.add_sent(sent)
    assert store.sent("example.org", 1, 2) == [sent]
    store.add_messages([message(0), message(10)])
    assert store.prune(1_800_000_005) == 2  # the first message and the sent report
    assert store.messages(0, 2**40) == [message(10)]
    assert store.sent("example.org", 1, 2) == []


def test_the_writer_batches_from_many_threads(store: SqlStore) -> None:
    writer = QueuedWriter(store, retention_days=36500)

    def put(k: int) -> None:
        for i in range(100):
            writer.put(message(k * 100 + i))

    threads = [threading.Thread(target=put, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert len(store.messages(0, 2**40)) == 800


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    gate = threading.Lock()
    gate.acquire()
    original = store.add_messages

    def stalled(rows: object) -> None:  # the database hangs
        with gate:
            original(rows)  # type: ignore[arg-type]

    store.add_messages = stalled  # type: ignore[method-assign]
    dropped: list[int] = []
    writer = QueuedWriter(store, retention_days=1, maxsize=10,
                          on_drop=lambda: dropped.append(1))
    started = time.monotonic()
    for i in range(50):
        writer.put(message(i))
    assert time.monotonic() - started < 3  # a blocking put would hang here: the bound is slack
    assert len(dropped) >= 39  # one row taken by the stalled thread, ten queued
    gate.release()
    writer.close()
    assert 0 < len(store.messages(0, 2**40)) <= 11


def test_the_writer_outlives_an_unexpected_error(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    original = store.add_messages
    calls: list[int] = []

    def buggy(rows: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        original(rows)  # type: ignore[arg-type]

    store.add_messages = buggy  # type: ignore[method-assign]
    errors: list[int] = []
    writer = QueuedWriter(store, retention_days=1, on_error=lambda: errors.append(1))
    writer.put(message(1))
    deadline = time.monotonic() + 10
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.put(message(2))
    writer.close()
    assert errors == [1]
    assert message(2) in store.messages(0, 2**40)


def test_unusable_stores_say_why(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match=r"bad\.sqlite|report store"):
        SqliteStore(str(bad))
    with pytest.raises(StoreError, match="postgresql"):
        open_store("postgresql", postgresql_url="postgresql://nobody@127.0.0.1:1/none")


def test_postgresql_comes_back_after_a_restart_of_the_connection(postgresql_url: str) -> None:
    store = open_store("postgresql", postgresql_url=postgresql_url)
    assert isinstance(store, PostgresStore)
    store._db.close()  # as a server restart leaves it
    store.add_messages([message(7)])
    assert message(7) in store.messages(0, 2**40)
    store.close()


def test_a_row_the_database_cannot_take_costs_only_itself(tmp_path: Path) -> None:
    """A lone surrogate (pymilter's surrogateescape) in one row made SQLite refuse the whole
    batch of up to 500 rows."""
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    errors: list[int] = []
    writer = QueuedWriter(store, retention_days=36500, on_error=lambda: errors.append(1))
    for i in range(200):
        writer.put(message(i))
    writer.put(message(500, envelope_from="x\udcff.example"))
    for i in range(200, 400):
        writer.put(message(i))
    writer.close()
    assert len(store.messages(0, 2**40)) == 400 and errors == [1]

