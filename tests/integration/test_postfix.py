"""End to end: real SMTP sessions through a private Postfix with mailward attached."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import dkim as dkimpy
import pytest

from mailward.lab.postfix import MailwardProcess, merge_ini
from mailward.services import keys
from mailward.services.dns import Budget, DnsSettings, Resolver
from tests.checks.test_dkim import publish, rsa_key
from tests.integration.conftest import BASE_CONFIG, Harness
from tests.packaging import test_monitoring

pytestmark = pytest.mark.integration


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n for n, _ in headers]


def got_text(headers: list[tuple[str, str]]) -> str:
    return "\n".join(f"{n}:{v}" for n, v in headers)


# -- the happy path --------------------------------------------------------------------------

def test_clean_message_over_tls_gets_our_authentication_results(harness: Harness) -> None:
    mid, data = harness.message("X-Fold: first\r\n\t second\r\n", body="Body.\r\n")
    data = data.replace(b"Subject: test", b"Subject:  two  spaces ")
    out = harness.send(data)
    assert (out.stage, out.code) == ("data", 250)
    got = harness.arrived(mid)
    headers = got.headers()
    assert names(headers) == ["Authentication-Results", "Received", "From", "To",
                              "Message-ID", "X-Fold", "Subject", "Date"]
    ar = headers[0][1]
    assert re.fullmatch(r" mx\.lab\.test;\n\tx-tls=pass smtp\.version=TLSv1\.3 "
                        r"smtp\.cipher=\S+ smtp\.bits=\d+;\n"
                        r"\tspf=none smtp\.helo=client\.example\.org;\n"
                        r"\tspf=pass smtp\.mailfrom=alice@example\.org;\n"
                        r"\tdkim=none;\n"
                        r"\tarc=none;\n"
                        r"\tdmarc=pass header\.from=example\.org policy\.dmarc=reject", ar), ar
    # header values arrive byte-exact (SMFIP_HDR_LEADSPC), folds included
    assert dict(headers)["Subject"] == "  two  spaces "
    assert dict(headers)["X-Fold"] == " first\n\t second"
    assert got.data.endswith(b"\r\n\r\nBody.\r\n")


def test_bcc_and_resent_bcc_are_removed(harness: Harness) -> None:
    mid, data = harness.message("Bcc: hidden@example.org\r\nResent-Bcc: r@example.org\r\n"
                                "X-Keep: 1\r\nBCC: second@example.org\r\n")
    assert harness.send(data).code == 250
    headers = harness.arrived(mid).headers()
    assert not [n for n in names(headers) if n.lower() in ("bcc", "resent-bcc")]
    assert ("X-Keep", " 1") in headers


def test_forged_authentication_results_are_removed_and_others_kept(harness: Harness) -> None:
    mid, data = harness.message(
        "Authentication-Results: mx.lab.test; spf=pass smtp.mailfrom=ceo@example.com\r\n"
        "Authentication-Results: other.example; dkim=pass header.d=example.org\r\n"
        "Authentication-Results: MX.LAB.TEST; dmarc=pass\r\n"
        "authentication-results: (forged) mx.lab.test 1; none\r\n"
        "Authentication-Results: third.example; spf=fail\r\n"
        "Authentication-Results: \"mx.lab.test\"\r\n")
    assert harness.send(data).code == 250
    ars = [v for n, v in harness.arrived(mid).headers()
           if n.lower() == "authentication-results"]
    assert ars[0].startswith(" mx.lab.test;\n\tx-tls=pass")
    assert ars[1:] == [" other.example; dkim=pass header.d=example.org",
                       " third.example; spf=fail"]


# -- TLS -------------------------------------------------------------------------------------

def test_no_tls_is_refused_per_recipient_before_data(harness: Harness) -> None:
    mid, data = harness.message()
    out = harness.send(data, ("a@secure.example", "b@example.net"), tls=None)
    assert out.stage == "data" and out.code == 250
    assert out.refused == {"a@secure.example": (530, "5.7.0 Must issue a STARTTLS command "
                                                     "first")}
    got = harness.arrived(mid)
    assert got.rcpts == ["b@example.net"]
    ar = dict(got.headers())["Authentication-Results"]
    assert ar.startswith(" mx.lab.test;\n\tx-tls=none;\n")


def test_require_inbound_refuses_at_mail_from(harness: Harness) -> None:
    with harness.configured("[check.tls]\nrequire_inbound = yes\n"):
        mid, data = harness.message()
        out = harness.send(data, tls=None)
        assert (out.stage, out.code, out.text) == (
            "mail", 530, "5.7.0 Must issue a STARTTLS command first")
        assert harness.send(data).code == 250  # with TLS
        harness.arrived(mid)


def test_quarantine_puts_the_message_in_the_hold_queue(harness: Harness) -> None:
    with harness.configured("[check.tls]\nmin_version = TLSv1.3\nversion_action = quarantine\n"):
        mid, data = harness.message()
        out = harness.send(data, ("q@secure.example",), tls="TLSv1.2")
        assert out.code == 250
        assert harness.held_for("q@secure.example"), harness.lab.queue()
        assert harness.not_arrived(mid)
        assert "milter-hold" in harness.lab.log_text()
        assert 'reason="tls: TLSv1.2 is older than TLSv1.3 (TLS required)"' in harness.mw.log()


def test_monitor_mode_accepts_and_counts_what_it_would_have_done(harness: Harness) -> None:
    with harness.configured("[milter]\nmode = monitor\n"):
        mid, data = harness.message("Bcc: kept@example.org\r\n")
        out = harness.send(data, ("m@secure.example",), tls=None)
        assert out.code == 250 and not out.refused
        headers = harness.arrived(mid).headers()
        assert "Bcc" in names(headers)  # monitor: nothing changed
        assert harness.metric("mailward_monitor_actions_total", check="tls",
                              action="reject") >= 1
        assert "tls=fail(would reject)" in harness.mw.log()


def test_spf_fail_refused_at_mail_from_when_configured(harness: Harness) -> None:
    mid, data = harness.message(sender="ceo@spfonly.example")
    out = harness.send(data, mail_from="ceo@spfonly.example")
    assert out.code == 250  # default: SPF alone decides nothing
    ar = dict(harness.arrived(mid).headers())["Authentication-Results"]
    assert "spf=fail smtp.mailfrom=ceo@spfonly.example" in ar
    assert "dmarc=none header.from=spfonly.example" in ar
    with harness.configured("[check.spf]\non_fail = reject\n"):
        out = harness.send(data, mail_from="ceo@spfonly.example")
        assert (out.stage, out.code, out.text) == ("mail", 550,
                                                   "5.7.23 SPF validation failed")
        assert harness.send(data, mail_from="alice@example.org").code == 250


def test_dkim_simple_canonicalization_survives_postfix(harness: Harness) -> None:
    pem, public = rsa_key(2048)
    publish(harness.dns, "it._domainkey.example.org", f"v=DKIM1; k=rsa; p={public}")
    mid, data = harness.message("X-Folded: first\r\n\t  second\r\n",
                                body="Body with trailing space  \r\n\r\n")
    data = data.replace(b"Subject: test", b"Subject:  two  spaces")
    for canon in ((b"simple", b"simple"), (b"relaxed", b"relaxed")):
        signed = dkimpy.sign(data, b"it", b"example.org", pem, canonicalize=canon) + data
        assert harness.send(signed).code == 250
    got = [m for m in harness.sink.messages if mid.encode() in m.data]
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        got = [m for m in harness.sink.messages if mid.encode() in m.data]
    assert len(got) == 2
    for m in got:
        ar = dict(m.headers())["Authentication-Results"]
        assert "dkim=pass header.d=example.org header.s=it header.a=rsa-sha256" in ar, ar


def test_dmarc_pass_with_dkim_and_spf(harness: Harness) -> None:
    pem, public = rsa_key(2048)
    publish(harness.dns, "dm._domainkey.example.org", f"v=DKIM1; k=rsa; p={public}")
    mid, data = harness.message()
    signed = dkimpy.sign(data, b"dm", b"example.org", pem) + data
    assert harness.send(signed).code == 250
    ar = dict(harness.arrived(mid).headers())["Authentication-Results"]
    assert "spf=pass smtp.mailfrom=alice@example.org" in ar
    assert "dkim=pass header.d=example.org header.s=dm" in ar
    assert "dmarc=pass header.from=example.org policy.dmarc=reject" in ar


def test_dmarc_reject_for_a_spoofed_domain(harness: Harness) -> None:
    mid, data = harness.message(sender="ceo@spoofed.example")
    out = harness.send(data, mail_from="alice@example.org")  # SPF passes, but not aligned
    assert (out.stage, out.code) == ("data", 550)
    assert out.text == ("5.7.1 Rejected by the DMARC policy of the sender domain "
                        "spoofed.example (p=reject)")
    assert harness.not_arrived(mid, wait=1)


def test_dmarc_quarantine_goes_to_the_hold_queue(harness: Harness) -> None:
    mid, data = harness.message(sender="billing@held.example", to="q2@example.net")
    assert harness.send(data, ("q2@example.net",), mail_from="alice@example.org").code == 250
    assert harness.held_for("q2@example.net"), harness.lab.queue()
    assert harness.not_arrived(mid, wait=1)
    assert "dmarc: held.example: p=quarantine at held.example" in harness.mw.log()


def test_a_tagged_quarantine_is_delivered_with_the_reason_for_the_users_junk_folder(
        harness: Harness) -> None:
    forged = "X-Mailward-Quarantine: none, trust me\r\n"
    mid, data = harness.message(forged, sender="billing@held.example", to="q3@example.net")
    with harness.configured("[policy]\nquarantine_subject_tag = [SPAM]\n"
                            "[check.dmarc]\nquarantine = tag\n"):
        assert harness.send(data, ("q3@example.net",), mail_from="alice@example.org").code == 250
        headers = harness.arrived(mid).headers()
    assert not harness.held_for("q3@example.net")
    assert [v.strip() for n, v in headers if n == "X-Mailward-Quarantine"] == [
        "dmarc: held.example: p=quarantine at held.example, applied quarantine"]
    assert dict(headers)["Subject"].strip() == "[SPAM] test"
    assert "verdict=quarantine quarantine=tag reason=" in harness.mw.log()
    # a folded UTF-8 Subject is tagged byte for byte; raw 8-bit bytes (no charset) cannot go
    # back through pymilter, so such a Subject is left as it came: delivered, not tempfailed
    for subject, tagged in (("caf\u00e9\r\n au lait", "[SPAM] caf\u00e9\r\n au lait"),
                            ("caf\udce9\r\n au lait", "caf\udce9\r\n au lait")):
        mid, data = harness.message(f"Subject: {subject}\r\n", sender="billing@held.example",
                                    to="q4@example.net")
        with harness.configured("[policy]\nquarantine_subject_tag = [SPAM]\n"
                                "[check.dmarc]\nquarantine = tag\n"):
            out = harness.send(data, ("q4@example.net",), mail_from="alice@example.org")
            assert out.code == 250, out
            raw = harness.arrived(mid).data
        want = f"\nSubject: {tagged}\r\n".encode("utf-8", "surrogateescape")
        assert want in raw and b"\nX-Mailward-Quarantine: dmarc: " in raw, raw


def test_submitted_mail_is_signed_and_inbound_is_not(harness: Harness, tmp_path: Path) -> None:
    rsa = keys.generate(domain="example.org", selector="sub1", directory=str(tmp_path))
    ed = keys.generate(domain="example.org", selector="sub2", kind="ed25519",
                       directory=str(tmp_path))
    for key in (rsa, ed):
        harness.dns.load_zone(keys.zone_line(key))
    signing = (f"[check.dkim_sign]\nkeys = example.org sub1 {rsa.path}\n"
               f"  example.org sub2 {ed.path}\n")
    with harness.configured(signing):
        mid, data = harness.message(TRACE_HEADERS + "Bcc: boss@example.org\r\n")
        assert harness.send(data, submission=True, login="alice@example.org").code == 250
        out = harness.arrived(mid)
        assert b"Bcc:" not in out.data and b"10.1.2.3" not in out.data
        # exactly what leaves: our two signatures over the sanitised header, the external hop
        assert names(out.headers()) == [
            "Authentication-Results", "DKIM-Signature", "DKIM-Signature", "From", "To",
            "Message-ID", "Received", "Subject", "Date"]
        assert "outside.example.org" in dict(out.headers())["Received"]
        d = dkimpy.DKIM(out.data)
        assert [d.verify(idx=i, dnsfunc=harness_resolver(harness).bind(Budget(30)).dkim_txt)
                for i in range(2)] == [True, True]
        mid, data = harness.message()
        assert harness.send(data).code == 250  # inbound
        assert b"DKIM-Signature" not in harness.arrived(mid).data


def harness_resolver(harness: Harness) -> Resolver:
    return Resolver(DnsSettings(nameservers=(("127.0.0.1", harness.dns.port),)))


def test_authenticated_user_may_only_send_as_itself(harness: Harness) -> None:
    mid, data = harness.message(sender="alice@example.org")
    out = harness.send(data, submission=True, login="alice@example.org",
                       mail_from="ceo@example.org")
    assert (out.stage, out.code, out.text) == (
        "mail", 553, "5.7.1 Sender address not owned by authenticated user")
    out = harness.send(data, submission=True, login="bob@example.org",
                       mail_from="bob@example.org")  # envelope fine, From is alice's
    assert (out.stage, out.code) == ("data", 553)
    assert harness.send(data, submission=True, login="alice@example.org").code == 250
    harness.arrived(mid)
    assert "user=alice@example.org direction=outbound" in harness.mw.log()


def test_relay_guard(harness: Harness) -> None:
    with harness.configured("[check.sender]\nrelay_guard = yes\n"):
        mid, data = harness.message(to="x@lab.test")
        out = harness.send(data, ("far@example.net", "x@lab.test"))
        assert out.refused == {"far@example.net": (554, "5.7.1 Relay access denied")}
        assert out.code == 250 and harness.arrived(mid).rcpts == ["x@lab.test"]
        assert harness.send(data, ("far@example.net",), submission=True,
                            login="alice@example.org").code == 250  # our user may relay


# -- trace -----------------------------------------------------------------------------------

TRACE_HEADERS = (
    "Received: from laptop.corp.lab.test (laptop.corp.lab.test [10.1.2.3])\r\n"
    "\tby relay.corp.lab.test with ESMTP id 42; Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    "Received: from outside.example.org (outside.example.org [198.51.100.7])\r\n"
    "\tby gw.example.org; Mon, 23 Nov 2026 09:59:00 +0000\r\n"
    "X-Originating-IP: [10.1.2.3]\r\n"
)


def test_trace_sanitised_on_outbound_only(harness: Harness) -> None:
    mid, data = harness.message(TRACE_HEADERS)
    assert harness.send(data, submission=True).code == 250
    headers = harness.arrived(mid).headers()
    received = [v for n, v in headers if n == "Received"]
    assert "X-Originating-IP" not in names(headers)
    # only the external hop is left: the internal one is mailward's work, Postfix's own
    # submission hop is dropped by the header_checks rule the README shows
    assert len(received) == 1 and "outside.example.org" in received[0]
    assert "10.1.2.3" not in got_text(headers) and "127.0.0.1" not in got_text(headers)

    mid, data = harness.message(TRACE_HEADERS)
    assert harness.send(data).code == 250  # inbound: untouched
    headers = harness.arrived(mid).headers()
    assert "X-Originating-IP" in names(headers)
    assert len([n for n in names(headers) if n == "Received"]) == 3


def test_trace_rewrite(harness: Harness) -> None:
    with harness.configured("[check.trace]\naction = rewrite\n"):
        mid, data = harness.message(TRACE_HEADERS)
        assert harness.send(data, submission=True).code == 250
        received = [v for n, v in harness.arrived(mid).headers() if n == "Received"]
        assert received[0] == (" from redacted.invalid (redacted.invalid [redacted])\n"
                               "\tby redacted.invalid with ESMTP id 42; "
                               "Mon, 23 Nov 2026 10:00:00 +0000")


# -- metrics, signals, config ----------------------------------------------------------------

def test_dashboard_and_alerts_query_exported_metrics(harness: Harness) -> None:
    """Every metric packaging/grafana/mailward.json and packaging/prometheus/mailward-rules.yml
    read is in the exposition of this running mailward, after a message and a DMARC failure
    have gone through."""
    mid, data = harness.message()
    assert harness.send(data).code == 250
    harness.arrived(mid)
    before = harness.metric("mailward_dmarc_failures_total", policy="reject")
    _, spoof = harness.message(sender="ceo@spoofed.example")
    assert harness.send(spoof, mail_from="ceo@spoofed.example").code == 550
    text = harness.metrics()
    assert test_monitoring.unknown_names(text) == {}
    assert harness.metric("mailward_dmarc_failures_total", policy="reject") == before + 1
    assert harness.metric("mailward_messages_total", direction="inbound",
                          verdict="reject") >= 1


def test_metrics_endpoint(harness: Harness) -> None:
    mid, data = harness.message()
    accepted = {"direction": "inbound", "verdict": "accept"}
    before = harness.metric("mailward_messages_total", **accepted)
    assert harness.send(data).code == 250
    harness.arrived(mid)
    text = harness.metrics()
    assert harness.metric("mailward_messages_total", **accepted) == before + 1
    assert re.search(r'^mailward_build_info\{version="[\d.]+"\} 1\.0$', text, re.M)
    assert re.search(r'^mailward_check_duration_seconds_bucket\{check="tls",le="0.005"\} ',
                     text, re.M)
    assert "mailward_connections_active " in text
    assert "mailward_errors_total" in text
    # bounded labels: no addresses anywhere in the exposition
    assert "@" not in text and "127.0.0.1" not in text


def test_milter_down_means_tempfail_not_loss(harness: Harness) -> None:
    harness.mw.stop()
    try:
        mid, data = harness.message()
        # Postfix answers every command with 4XX (even STARTTLS, 454): use plain text
        out = harness.send(data, tls=None)
        assert (out.code, out.text) == (451, "4.7.1 Service unavailable - try again later")
    finally:
        harness.mw.start()
    out = harness.send(data)
    assert out.code == 250
    harness.arrived(mid)


@pytest.mark.expect_log_errors
def test_reload_with_sigusr1(harness: Harness) -> None:
    assert harness.mw.proc is not None
    good = merge_ini(BASE_CONFIG, "[check.tls]\nrequire_inbound = yes\n")
    try:
        harness.mw.config_path().write_text("[milter]\nsockte = typo\n")
        harness.mw.proc.send_signal(signal.SIGUSR1)
        _wait_for(lambda: "reload failed" in harness.mw.log())
        assert "[milter] sockte: expected a known key" in harness.mw.log()
        _mid, data = harness.message()
        assert harness.send(data, tls=None).code == 250  # old config still in force

        harness.reload(good)
        assert harness.send(data, tls=None).code == 530
        assert harness.metric("mailward_config_reloads_total", outcome="failed") == 1
    finally:
        harness.mw.stop()
        harness.mw.write(BASE_CONFIG)
        harness.mw.start()


def _wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_stops_gracefully_with_metrics_thread(tmp_path: Path) -> None:
    mw = MailwardProcess(BASE_CONFIG, tmp_path)
    mw.start()
    assert mw.proc is not None
    with socket.create_connection(("127.0.0.1", mw.metrics_port), timeout=5):
        pass  # the metrics thread is up
    mw.proc.send_signal(signal.SIGTERM)
    assert mw.proc.wait(15) == 0
    assert "mailward stopped" in mw.log()
    mw.proc = None


@pytest.mark.parametrize(("text", "message"), [
    ("[milter]\nsockte = inet:1@127.0.0.1\n", "[milter] sockte: expected a known key"),
    ("[milter]\nsocket = inet:70000@127.0.0.1\n", "[milter] socket: expected inet:PORT@HOST"),
])
def test_bad_config_refuses_to_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "mailward", "run", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"mailward: {path}: ") and message in done.stderr


def test_check_config_command() -> None:
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "mailward", "check-config", "-c",
                           str(repo / "conf" / "mailward.ini")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "[check.tls]\nenabled = yes" in done.stdout


def test_unix_socket(tmp_path: Path, harness: Harness) -> None:
    sock = tmp_path / "milter.sock"
    tmp_path.chmod(0o755)
    mw = MailwardProcess(merge_ini(BASE_CONFIG, f"[milter]\nsocket = unix:{sock}\n"), tmp_path)
    mw.write()
    assert mw.proc is None
    mw.proc = subprocess.Popen([sys.executable, "-m", "mailward", "run", "-c",
                                str(mw.config_path())], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for(sock.exists)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
    finally:
        assert mw.stop() == 0


def test_the_milter_runs_on_the_engine_the_suite_asked_for(harness: Harness) -> None:
    """`make test` runs the suite on the default engine (asyncio), then on Debian's python3
    with MAILWARD_TEST_ENGINE=libmilter: each passes every test that starts a milter."""
    engine = os.environ.get("MAILWARD_TEST_ENGINE") or "asyncio"
    assert f"(engine {engine})" in harness.mw.log()


def test_a_client_slower_at_data_than_the_milter_timeout_is_served(harness: Harness) -> None:
    """Postfix sends the milter nothing while its client sends DATA (cleanup passes the
    header on once the message is in): a transfer longer than [milter] timeout must not cost
    the milter connection, or Postfix tempfails the message (451 4.7.1) on every retry."""
    harness.mw.stop()
    harness.mw.write(merge_ini(BASE_CONFIG, "[milter]\ntimeout = 1\n"))
    harness.mw.start()
    try:
        mid, data = harness.message()
        with smtplib.SMTP("127.0.0.1", harness.lab.smtp_port, timeout=60) as s:
            s.ehlo("client.example.org")
            assert s.mail("alice@example.org")[0] == 250
            assert s.rcpt("bob@example.net")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(data[:40])
            time.sleep(3)  # a slow link
            s.send(data[40:] + b"\r\n.\r\n")
            code, text = s.getreply()
        assert code == 250, text
        harness.arrived(mid)
    finally:
        harness.mw.stop()
        harness.mw.write(BASE_CONFIG)
        harness.mw.start()
