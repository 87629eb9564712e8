"""What the milter calls: a store that cannot be opened at start is retried in the
background, and mail is never held up for it."""

from __future__ import annotations

import time
from pathlib import Path

from mailward.core.settings import ReportsSettings
from mailward.reports.hooks import Reporting
from mailward.services.metrics import Metrics
from mailward.services.reportstore import SqliteStore
from tests.core.test_reporting import TX, outcome, verdict


def test_a_store_that_is_not_there_yet_is_retried(tmp_path: Path) -> None:
    where = tmp_path / "not-yet"  # the directory is missing: SQLite cannot open the file
    metrics = Metrics()
    reporting = Reporting(ReportsSettings(sqlite_path=str(where / "r.sqlite")), metrics,
                          retry_interval=0.1)

    def rows(outcome_label: str) -> float:
        return metrics.registry.get_sample_value("mailward_report_rows_total",
                                                 {"outcome": outcome_label}) or 0.0

    try:
        assert reporting.writer is None and rows("error") == 1
        started = time.monotonic()
        reporting.judged(TX, verdict(outcome()))  # counted, not waited for
        # no wait for the store (retried in the background); 1 s, not 0.1 s, leaves a busy
        # machine's scheduler room: the call itself takes microseconds
        assert time.monotonic() - started < 1 and rows("dropped") == 1
        where.mkdir()
        deadline = time.monotonic() + 10
        while reporting.writer is None:
            assert time.monotonic() < deadline, "the store was not opened again"
            time.sleep(0.05)
        reporting.judged(TX, verdict(outcome()))
        assert rows("queued") == 1
    finally:
        reporting.close()
    assert len(SqliteStore(str(where / "r.sqlite")).messages(0, 2**40)) == 1


def test_the_milter_keeps_a_small_page_cache(tmp_path: Path) -> None:
    """The milter's store only appends rows: SQLite's page cache is 256 KiB there (1.8 MiB
    less resident after 20,000 rows), not its default 2,000, which reports build and show
    keep for their queries."""
    path = str(tmp_path / "r.sqlite")
    reporting = Reporting(ReportsSettings(sqlite_path=path), Metrics())
    try:
        assert isinstance(reporting.store, SqliteStore)
        assert reporting.store._db.execute("PRAGMA cache_size").fetchone()[0] == -256
    finally:
        reporting.close()
    assert SqliteStore(path)._db.execute("PRAGMA cache_size").fetchone()[0] == -2000
