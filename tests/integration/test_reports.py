"""DMARC aggregate reports end to end (issue 11, item 5), through the real Postfix.

Mail from owner.test (which publishes p=reject and rua=mailto:dmarc-rua@owner.test) passes and
fails DMARC at the lab's MX; the outcomes fill the store (a tempfailed attempt does not);
`mailward reports build` makes the report, valid against the schema; `--send` mails it,
DKIM-signed for reporter.test, through the lab's Postfix to owner.test's rua mailbox, where the
same mailward, as owner.test's MX, reads it as it passes: the report comes back with the same
counts, and `reports show` says who sent as owner.test. A forged report (its mail not passing
DMARC) is kept apart.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from mailward.lab.postfix import Lab, merge_ini, missing_tools, running_lab
from mailward.services import keys
from mailward.services.reportstore import SqliteStore
from tests.conftest import need
from tests.integration.conftest import BASE_CONFIG, Harness

SCHEMA = etree.XMLSchema(etree.parse(str(
    Path(__file__).resolve().parents[1] / "data" / "reports" / "dmarc-aggregate-report-0.2.xsd")))

ZONE = """
owner.test.              TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.owner.test.       TXT ( "v=DMARC1; p=reject; rua=mailto:dmarc-rua@owner.test,"
                               "mailto:r@collector.test,mailto:x@unverified.test" )
owner.test._report._dmarc.collector.test. TXT "v=DMARC1"
evil.test.               TXT "v=spf1 -all"
broken.test.             TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.broken.test.      TXT "v=DMARC1; p=reject"
reporter.test.           TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.reporter.test.    TXT "v=DMARC1; p=reject"
nodmarc.test.            TXT "v=spf1 ip4:127.0.0.1 -all"
watched.test.            TXT "v=spf1 -all"
_dmarc.watched.test.     TXT ( "v=DMARC1; p=reject; sp=quarantine; np=reject; adkim=s; "
                               "aspf=r; t=n" )
retry.test.              TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.retry.test.       TXT "v=DMARC1; p=quarantine"
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, Harness]]:
    need(os.geteuid() == 0, "the integration tests start a private Postfix and need root")
    missing = missing_tools()
    need(not missing, f"Debian packages missing: apt-get install {' '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="mailward-reports-"))
    # the reports go out from reporter.test, a domain of ours the lab MX does not host, so
    # that it judges them as any receiver would (lab.test mail from outside is refused)
    key = keys.generate(domain="reporter.test", selector="rep", directory=str(root))
    os.chmod(key.path, 0o600)
    config = merge_ini(BASE_CONFIG, f"""
[check.dkim_sign]
keys = reporter.test rep {key.path}

[reports]
org_name = reporter.test
sender = dmarc-reports@reporter.test
relay_tls = may
ingest_addresses = dmarc-rua@owner.test
""")
    try:
        with running_lab(config, root=root, zone=ZONE + keys.zone_line(key) + "\n") as running:
            ini = running.mailward.config_path()
            # the lab MX is where report mail is handed over: relay = its smtp port
            ini.write_text(ini.read_text().replace(
                "[reports]\n", f"[reports]\nrelay = 127.0.0.1:{running.postfix.smtp_port}\n", 1))
            yield running, Harness(running.postfix, running.mailward, running.sink,
                                   running.dns)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mailward(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailward", *args, "-c",
                           str(lab.mailward.config_path())], capture_output=True, text=True,
                          check=False, timeout=120)


def store(lab: Lab) -> SqliteStore:
    return SqliteStore(str(lab.mailward.workdir / "reports.sqlite"))


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_reports_from_live_verdicts_round_trip(lab: tuple[Lab, Harness],
                                               tmp_path: Path) -> None:
    running, h = lab
    db = store(running)
    # three aligned passes, two spoofs (rejected), and an attempt tempfailed by a DNS failure
    for _ in range(3):
        _, data = h.message(sender="alice@owner.test", to="bob@example.net")
        assert h.send(data, mail_from="alice@owner.test").code == 250
    for _ in range(2):
        _, data = h.message(sender="ceo@owner.test", to="bob@example.net")
        assert h.send(data, mail_from="x@evil.test").code == 550
    running.dns.servfail.add("_dmarc.broken.test")
    _, data = h.message(sender="a@broken.test", to="bob@example.net")
    assert h.send(data, mail_from="a@broken.test").code == 451
    wait_for(lambda: len(db.messages(0, 2**40)) >= 5)
    time.sleep(1)  # four times the writer's linger: a sixth row would be there
    rows = db.messages(0, 2**40)
    assert sorted((r.policy_domain, r.disposition, r.spf_aligned) for r in rows) == [
        ("owner.test", "pass", "pass")] * 3 + [("owner.test", "reject", "fail")] * 2
    assert dict(rows[0].policy)["rua"].startswith("mailto:dmarc-rua@owner.test")

    # build, to files: one report, valid against the schema
    out = tmp_path / "out"
    built = mailward(running, "reports", "build", "--period", "today", "--out", str(out))
    assert built.returncode == 0, built.stderr
    files = list(out.iterdir())
    assert [f.name.split("!")[:2] for f in files] == [["reporter.test", "owner.test"]]
    xml = gzip.decompress(files[0].read_bytes())
    SCHEMA.assertValid(etree.fromstring(xml))
    # send: to owner.test's own mailbox and the verified external one; not the unverified
    sent = mailward(running, "reports", "build", "--period", "today", "--send")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "dmarc-rua@owner.test: sent" in sent.stdout
    assert "r@collector.test: sent" in sent.stdout
    assert "mailto:x@unverified.test: skipped: external destination not verified" in sent.stdout
    again = mailward(running, "reports", "build", "--period", "today", "--send")
    assert "dmarc-rua@owner.test: already sent" in again.stdout

    # the report mail went out through the lab MX: signed, DMARC pass, delivered untouched
    mail = h.sink.wait_for(lambda m: "dmarc-rua@owner.test" in m.rcpts)
    headers = dict((k.lower(), v) for k, v in mail.headers())
    assert headers["subject"].split() == [
        "Report", "Domain:", "owner.test", "Submitter:", "reporter.test", "Report-ID:",
        f"<{files[0].name.split('!')[2]}.owner.test@reporter.test>"]
    assert "dkim=pass" in headers["authentication-results"]
    assert "smtp.version=TLSv1.3" in headers["authentication-results"]  # STARTTLS to the relay
    assert "dmarc=pass" in headers["authentication-results"]

    # ... and, as owner.test's MX, mailward read it as it passed: the same counts come back
    wait_for(lambda: db.reports(0))
    [report] = db.reports(0)
    assert (report.org_name, report.policy_domain, report.authenticated) == (
        "reporter.test", "owner.test", True)
    assert sorted((r.source_ip, r.count, r.disposition) for r in report.rows) == [
        ("127.0.0.1", 2, "reject"), ("127.0.0.1", 3, "pass")]
    # report mail is never itself reported
    assert len(db.messages(0, 2**40)) == 5

    shown = mailward(running, "reports", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    [source] = json.loads(shown.stdout)
    assert (source["source_ip"], source["messages"], source["dmarc_rate"],
            source["dispositions"]) == ("127.0.0.1", 5, 60.0, {"pass": 3, "reject": 2})
    assert h.metric("mailward_reports_ingested_total", outcome="accepted") == 1
    # what the timer's run did, read from the store when Prometheus scrapes
    assert h.metric("mailward_reports_generated") == 1
    assert h.metric("mailward_reports_sent", status="sent") == 2
    assert h.metric("mailward_reports_sent", status="skipped") == 1
    assert h.metric("mailward_reports_sent", status="failed") == 0

    # a forged report: its mail does not pass DMARC (nodmarc.test has no policy), so it is
    # stored apart and shown only on request
    forged = files[0].read_bytes()
    raw = (b"From: noreply@nodmarc.test\r\nTo: dmarc-rua@owner.test\r\nSubject: Report\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: application/gzip\r\nContent-Disposition: "
           b"attachment; filename=\"evil!owner.test!1!2.xml.gz\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n")
    raw += base64.encodebytes(gzip.compress(
        gzip.decompress(forged).replace(b"reporter.test", b"evil.test"))).replace(b"\n", b"\r\n")
    assert h.send(raw, ("dmarc-rua@owner.test",), mail_from="noreply@nodmarc.test").code == 250
    wait_for(lambda: len(db.reports(0)) == 2)
    shown = json.loads(mailward(running, "reports", "show", "--json").stdout)
    assert [s["reporter"] for s in shown] == ["reporter.test"]
    hidden = json.loads(mailward(running, "reports", "show", "--json",
                                 "--unauthenticated").stdout)
    assert [s["reporter"] for s in hidden] == ["evil.test (mail from nodmarc.test)"]
    assert "not authenticate are not shown" in mailward(running, "reports", "show").stdout


def test_the_disposition_recorded_is_the_one_applied(lab: tuple[Lab, Harness]) -> None:
    """Spoofs of watched.test (p=reject) under local settings that change what is done with
    them: each row says what was applied and why; a tempfailed attempt is counted once, when
    its retry is judged."""
    running, h = lab
    db = store(running)
    start = int(time.time())
    queued = h.metric("mailward_report_rows_total", outcome="queued")
    configured = running.mailward.config_path().read_text()
    spoof = {"sender": "ceo@watched.test", "to": "bob@example.net"}
    try:
        for extra, code in (("[check.dmarc]\nmode = monitor\n", 250),
                            ("[check.dmarc]\nnever_reject = watched.test\n", 250),
                            ("[check.dmarc]\nreject_as = accept\n", 250),
                            ("", 550)):
            h.reload(merge_ini(configured, extra))
            _, data = h.message(**spoof)
            assert h.send(data, mail_from="x@evil.test").code == code, extra
    finally:
        h.reload(configured)
    # retry.test: the first attempt tempfails (DNS), the retry passes; one row
    running.dns.servfail.add("_dmarc.retry.test")
    _, data = h.message(sender="a@retry.test", to="bob@example.net")
    assert h.send(data, mail_from="a@retry.test").code == 451
    running.dns.servfail.discard("_dmarc.retry.test")
    assert h.send(data, mail_from="a@retry.test").code == 250

    wait_for(lambda: len(db.messages(start, 2**40, policy_domain="retry.test")) == 1)
    rows = db.messages(start, 2**40, policy_domain="watched.test")
    assert [(r.disposition, r.reasons) for r in rows] == [
        ("none", (("local_policy", "monitor mode: would reject"),)),
        ("quarantine", (("local_policy", "policy asked reject, applied quarantine"),)),
        ("none", (("local_policy", "policy asked reject, applied none"),)),
        ("reject", ())]
    assert {(r.source_ip, r.header_from, r.envelope_from, r.dkim_aligned, r.spf_aligned,
             r.spf, r.dkim) for r in rows} == {
        ("127.0.0.1", "watched.test", "evil.test", "fail", "fail",
         ("evil.test", "mailfrom", "fail"), ())}
    assert dict(rows[0].policy) == {
        "p": "reject", "sp": "quarantine", "np": "reject", "adkim": "s", "aspf": "r",
        "testing": "n", "discovery_method": "treewalk"}
    [retried] = db.messages(start, 2**40, policy_domain="retry.test")
    assert (retried.disposition, retried.spf_aligned, retried.reasons) == ("pass", "pass", ())
    assert h.metric("mailward_report_rows_total", outcome="queued") == queued + 5
    assert h.metric("mailward_report_rows_total", outcome="dropped") == 0
