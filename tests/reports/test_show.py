"""`mailward reports show` and `html`: who sends as our domains, failing sources first, forged
reports apart; the HTML page loaded in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailward.reports.aggregate import render
from mailward.reports.ingest import Limits, ingest_message
from mailward.reports.show import reporter, select, sources
from mailward.services.reportstore import IngestedReport, ReportRow, SqliteStore
from tests.conftest import need
from tests.reports.test_aggregate import report_of

NOW = int(time.time())


def report(org: str, day: int, rows: tuple[ReportRow, ...], *, authenticated: bool = True,
           domain: str = "example.org") -> IngestedReport:
    return IngestedReport(received=NOW - day * 86400, source="test", status="accepted",
                          authenticated=authenticated, org_name=org, report_id=f"{org}-{day}",
                          begin=NOW - (day + 1) * 86400, end=NOW - day * 86400 - 1,
                          policy_domain=domain, rows=rows)


GOOD = ReportRow("192.0.2.10", 40, "none", "pass", "pass", "example.org")
FORGOTTEN = ReportRow("198.51.100.20", 7, "quarantine", "fail", "fail", "example.org")
SPOOF = ReportRow("203.0.113.66", 5, "reject", "fail", "fail", "example.org")
REPORTS = [
    report("google.com", 1, (GOOD, SPOOF)),
    report("google.com", 2, (GOOD, FORGOTTEN)),
    report("<script>alert(1)</script>", 1, (SPOOF,)),
    report("attacker.example", 1, (ReportRow("203.0.113.99", 1000, "none", "pass", "pass",
                                             "example.org"),), authenticated=False),
    report("google.com", 1, (GOOD,), domain="other.example"),
]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    store = SqliteStore(str(tmp_path / "reports.sqlite"))
    for r in REPORTS:
        assert store.add_report(r)
    store.close()
    ini = tmp_path / "mailward.ini"
    ini.write_text(f"[milter]\nlocal_domains = example.org\n[reports]\n"
                   f"sqlite_path = {tmp_path / 'reports.sqlite'}\n")
    return ini


def mailward(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailward", "reports", *args, "-c",
                           str(config)], capture_output=True, text=True, check=False,
                          timeout=60)


def test_failing_sources_first_and_forged_reports_apart() -> None:
    found = sources(select(REPORTS, domain="example.org"))
    # failing first (the most mail first), then the rest
    assert [(s.source_ip, s.reporter, s.messages, s.rate(s.dmarc_pass)) for s in found] == [
        ("198.51.100.20", "google.com", 7, 0.0),
        ("203.0.113.66", "<script>alert(1)</script>", 5, 0.0),
        ("203.0.113.66", "google.com", 5, 0.0),
        ("192.0.2.10", "google.com", 80, 100.0)]
    assert found[0].dispositions == {"quarantine": 7}
    assert [s.reporter for s in sources(select(REPORTS, authenticated=False))] == [
        "attacker.example"]


def test_a_report_that_claims_another_organisation_says_who_mailed_it() -> None:
    claimed = dataclasses.replace(REPORTS[0], auth_detail="dmarc=pass header.from=evil.example")
    genuine = dataclasses.replace(REPORTS[0], auth_detail="dmarc=pass header.from=google.com")
    assert reporter(claimed) == "google.com (mail from evil.example)"
    assert reporter(genuine) == "google.com"
    assert {s.reporter for s in sources([claimed])} == {"google.com (mail from evil.example)"}


def test_show_text_and_json(config: Path) -> None:
    text = mailward(config, "show", "--domain", "example.org")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["domain", "source", "reporter", "messages"]
    assert "198.51.100.20" in lines[1] and "0.0%" in lines[1]
    assert lines[-1] == ("(1 report(s) whose mail did not authenticate are not shown: "
                         "--unauthenticated)")
    data = json.loads(mailward(config, "show", "--json", "--since", "36h").stdout)
    # reports received more than 36 hours ago are left out
    assert {(d["source_ip"], d["messages"]) for d in data} == {
        ("203.0.113.66", 5), ("192.0.2.10", 40)}
    forged = mailward(config, "show", "--unauthenticated")
    assert "reports whose mail did NOT pass DMARC" in forged.stdout
    assert "203.0.113.99" in forged.stdout and "192.0.2.10" not in forged.stdout


def test_the_page_renders_in_a_real_browser(config: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    need(browser is not None, "chromium is missing: apt-get install chromium")
    page = tmp_path / "report.html"
    done = mailward(config, "html", "--out", str(page), "--domain", "example.org")
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "<script>alert(1)</script>" not in text  # a reporter's name is text, not markup
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    dom = subprocess.run([str(browser), "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    # the script ran: one bar per day with reports (two), and the pass-rate line
    assert re.search(r'<svg id="chart"[^>]*data-drawn="2"', dom), dom[:2000]
    assert len(re.findall(r'<rect class="volume"', dom)) == 2
    assert "<polyline" in dom
    rows = re.findall(r"<tr( class=\"fail\")?><td>example\.org</td><td>([^<]+)</td>", dom)
    assert [(bool(css), ip) for css, ip in rows] == [
        (True, "198.51.100.20"), (True, "203.0.113.66"), (True, "203.0.113.66"),
        (False, "192.0.2.10")]
    assert "203.0.113.99" not in dom  # the forged report is not on the page


def test_bad_periods_get_a_clear_answer(config: Path) -> None:
    done = mailward(config, "show", "--since", "last tuesday")
    assert (done.returncode, done.stderr) == (
        1, "mailward: --since 'last tuesday': expected 7d, 24h, 30m or YYYY-MM-DD\n")
    done = mailward(config, "build", "--period", "soon")
    assert done.returncode == 1 and "--period 'soon'" in done.stderr


def test_a_report_is_authenticated_only_when_its_mail_speaks_for_its_organisation(
        tmp_path: Path) -> None:
    xml = render(report_of())  # org_name mx.example.net, email dmarc-reports@example.net
    raw = (b"From: r@x\r\nContent-Type: text/xml\r\nContent-Disposition: attachment; "
           b"filename=r.xml\r\n\r\n" + xml)
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    for n, sender in enumerate(("evil.example", "mail.example.net")):
        assert ingest_message(store, raw.replace(b"example.org<", f"o{n}.example<".encode()),
                              Limits(10**6, 100), source=f"m{n}", authenticated=True,
                              detail=f"dmarc=pass header.from={sender}",
                              sender_domain=sender) == ["accepted"]
    found = store.reports(0)
    assert [(r.policy_domain, r.authenticated) for r in found] == [
        ("o0.example", False), ("o1.example", True)]
    assert "evil.example does not speak for mx.example.net" in found[0].auth_detail
