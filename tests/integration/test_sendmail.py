"""mailward behind a real Sendmail (Debian 12's 8.17, unpacked privately: lab/sendmail.py).

The same lab DNS zone and mailward configuration as the Postfix tests; Sendmail calls mailward
through INPUT_MAIL_FILTER with its default confMILTER_MACROS_*, which carry what mailward reads
({daemon_name} at connect, the TLS macros at HELO, i and the auth macros at MAIL FROM).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mailward.lab import sendmail
from mailward.lab.dns import Nameserver
from mailward.lab.postfix import Captured, CaptureSink, MailwardProcess, merge_ini
from tests.conftest import need
from tests.integration.conftest import BASE_CONFIG, ZONE

pytestmark = pytest.mark.integration

CONFIG = merge_ini(BASE_CONFIG, """
[milter]
# Sendmail names its submission daemon MSA (DAEMON_OPTIONS Name=MSA)
originating_daemons = MSA
""")


@dataclass
class Rig:
    sendmail: sendmail.SendmailLab
    mw: MailwardProcess
    sink: CaptureSink

    def send(self, data: bytes, rcpt: str = "bob@example.net", *,
             mail_from: str = "alice@example.org", tls: bool = False,
             msa: bool = False) -> tuple[int, str]:
        """One transaction; the reply that ended it (at RCPT TO or after DATA)."""
        port = self.sendmail.msa_port if msa else self.sendmail.port
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example.org")
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s.starttls(context=ctx)
                s.ehlo("client.example.org")
            code, resp = s.mail(mail_from)
            assert code == 250, resp
            code, resp = s.rcpt(rcpt)
            if code != 250:
                return code, resp.decode()
            code, resp = s.data(data)
            return code, resp.decode()

    def arrived(self, mid: str) -> Captured:
        return self.sink.wait_for(lambda m: mid.encode() in m.data, 30)

    def not_arrived(self, mid: str) -> bool:
        try:
            self.sink.wait_for(lambda m: mid.encode() in m.data, 2)
        except TimeoutError:
            return True
        return False


def message(mid: str, sender: str = "alice@example.org", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.net\r\n{extra}Message-ID: {mid}\r\n"
            f"Subject: via Sendmail\r\n\r\nHello.\r\n").encode()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    need(os.geteuid() == 0, "the Sendmail lab needs root")
    missing = sendmail.missing_tools()
    need(not missing, f"Debian packages missing: apt-get install {' '.join(missing)}")
    root = sendmail.lab_directory()
    ns = Nameserver()
    ns.load_zone(ZONE)
    sink = CaptureSink()
    mw = MailwardProcess(CONFIG, root / "mailward", port=0, dns_port=ns.port)
    lab = sendmail.SendmailLab(root / "sendmail", f"local:{mw.socket_path}", sink.port)
    try:
        lab.root.mkdir(mode=0o755)
        mw.start()
        lab.start()
        yield Rig(lab, mw, sink)
    finally:
        lab.stop()
        mw.stop()
        sink.close()
        ns.close()
        if not os.environ.get("MAILWARD_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_unexpected_log_lines(rig: Rig) -> Iterator[None]:
    before = len(rig.mw.log())
    yield
    bad = [ln for ln in rig.mw.log()[before:].splitlines()
           if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    assert not bad, "unexpected log lines:\n" + "\n".join(bad)


def test_accepted_with_our_authentication_results(rig: Rig) -> None:
    """SPF and DMARC pass; our Authentication-Results on top; the Bcc field gone (Sendmail
    drops it too); the log line carries Sendmail's queue id (macro i)."""
    mid = "<sendmail-accept@example.org>"
    code, text = rig.send(message(mid, extra="Bcc: hidden@example.org\r\n"))
    assert code == 250, text
    queue_id = re.search(r"2\.0\.0 (\w+) Message accepted", text)
    assert queue_id, text
    mail = rig.arrived(mid)
    headers = mail.headers()
    assert headers[0][0] == "Authentication-Results"
    ar = headers[0][1]
    assert ar.strip().startswith("mx.lab.test;")
    assert "spf=pass smtp.mailfrom=alice@example.org" in ar
    assert "dmarc=pass header.from=example.org" in ar
    assert "x-tls=none" in ar
    assert not [v for n, v in headers if n.lower() == "bcc"]
    assert f"qid={queue_id.group(1)} client=127.0.0.1 direction=inbound" in rig.mw.log()


def test_tls_refused_without_starttls_and_passed_with_it(rig: Rig) -> None:
    """secure.example requires TLS: refused at RCPT TO in clear text; over STARTTLS the
    message passes and mailward names the version Sendmail negotiated."""
    mid = "<sendmail-tls@example.org>"
    code, text = rig.send(message(mid), "carol@secure.example")
    assert (code, text) == (530, "5.7.0 Must issue a STARTTLS command first")
    code, text = rig.send(message(mid), "carol@secure.example", tls=True)
    assert code == 250, text
    ar = rig.arrived(mid).headers()[0][1]
    assert re.search(r"x-tls=pass smtp\.version=TLSv1\.[23] smtp\.cipher=\S+", ar), ar


def test_dmarc_reject(rig: Rig) -> None:
    mid = "<sendmail-dmarc@example.org>"
    code, text = rig.send(message(mid, sender="ceo@spoofed.example"))
    assert (code, text) == (550, "5.7.1 Rejected by the DMARC policy of the sender domain "
                                 "spoofed.example (p=reject)")
    assert rig.not_arrived(mid)


def test_submission_daemon_counts_as_outbound(rig: Rig) -> None:
    """{daemon_name} reaches mailward: mail on Sendmail's MSA port is outbound."""
    mid = "<sendmail-msa@example.org>"
    code, text = rig.send(message(mid), msa=True)
    assert code == 250, text
    rig.arrived(mid)
    line = next(ln for ln in rig.mw.log().splitlines() if "from=<alice@example.org>" in ln
                and "direction=outbound" in ln)
    assert "verdict=accept" in line
