"""A real private Postfix with mailward attached, shared by the integration tests.

Postfix listens on two loopback ports: `smtp` (mail from 127.0.0.1 counts as inbound under
the config below) and `submission` ({daemon_name} ORIGINATING, so outbound). Messages are
relayed to a capture sink. Tests that need other mailward settings restart mailward with
`harness.configured(...)`; Postfix keeps running.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import smtplib
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import (
    LAB_CONFIG,
    Captured,
    CaptureSink,
    MailwardProcess,
    PostfixLab,
    merge_ini,
    missing_tools,
    running_lab,
)
from tests.conftest import need

BASE_CONFIG = merge_ini(LAB_CONFIG, """
[milter]
local_domains = lab.test
spool_threshold = 256K

[check.tls]
require_domains = secure.example

[check.trace]
internal_hosts = corp.lab.test
""")

_ids = itertools.count(1)


@dataclass
class Outcome:
    """How an SMTP transaction ended: `stage` is mail, rcpt or data; refused per recipient."""

    stage: str
    code: int
    text: str
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


# DNS the integration tests' mailward sees: alice@example.org may send from the lab's
# 127.0.0.1 (SPF, aligned: DMARC pass); spoofed.example and held.example allow nobody and
# publish DMARC reject and quarantine; spfonly.example has SPF but no DMARC.
ZONE = """
example.org.             TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.example.org.      TXT "v=DMARC1; p=reject"
spoofed.example.         TXT "v=spf1 -all"
_dmarc.spoofed.example.  TXT "v=DMARC1; p=reject"
held.example.            TXT "v=spf1 -all"
_dmarc.held.example.     TXT "v=DMARC1; p=quarantine"
spfonly.example.         TXT "v=spf1 -all"
"""


@dataclass
class Harness:
    lab: PostfixLab
    mw: MailwardProcess
    sink: CaptureSink
    dns: Nameserver

    def message(self, headers: str = "", body: str = "Hello.\r\n", *,
                sender: str = "alice@example.org", to: str = "bob@example.net") -> tuple[
                    str, bytes]:
        mid = f"<it-{next(_ids)}-{os.getpid()}@example.org>"
        text = (f"From: {sender}\r\nTo: {to}\r\nMessage-ID: {mid}\r\n{headers}"
                f"Subject: test\r\n\r\n{body}")
        return mid, text.encode("utf-8", "surrogateescape")

    def send(self, data: bytes, rcpts: tuple[str, ...] = ("bob@example.net",), *,
             mail_from: str = "alice@example.org", tls: str | None = "TLSv1.3",
             submission: bool = False, login: str = "") -> Outcome:
        """One SMTP transaction; `login` claims a SASL login through XCLIENT (the lab allows
        that for 127.0.0.1), which the milter sees as {auth_authen}."""
        port = self.lab.submission_port if submission else self.lab.smtp_port
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            s.ehlo("client.example.org")
            if login:
                code, resp = s.docmd("XCLIENT", f"LOGIN={login}")
                assert code == 220, resp
                s.ehlo("client.example.org")
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.maximum_version = ssl.TLSVersion[tls.replace(".", "_")]
                s.starttls(context=ctx)
                s.ehlo("client.example.org")
            code, resp = s.mail(mail_from)
            if code != 250:
                return Outcome("mail", code, resp.decode())
            refused = {}
            for rcpt in rcpts:
                code, resp = s.rcpt(rcpt)
                if code >= 400:
                    refused[rcpt] = (code, resp.decode())
            if len(refused) == len(rcpts):
                code, text = refused[rcpts[-1]]
                return Outcome("rcpt", code, text, refused)
            code, resp = s.data(data)
            return Outcome("data", code, resp.decode(), refused)

    def arrived(self, mid: str, timeout: float = 30) -> Captured:
        return self.sink.wait_for(lambda m: mid.encode() in m.data, timeout)

    def held_for(self, address: str, timeout: float = 20) -> list[dict[str, object]]:
        """Hold-queue entries with a recipient `address`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            held = [q for q in self.lab.held()
                    if any(r.get("address") == address
                           for r in q.get("recipients", []))]  # type: ignore[attr-defined]
            if held or time.monotonic() > deadline:
                return held
            time.sleep(0.2)

    def not_arrived(self, mid: str, wait: float = 2) -> bool:
        try:
            self.sink.wait_for(lambda m: mid.encode() in m.data, wait)
        except TimeoutError:
            return True
        return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.mw.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, lbl = series.partition("{")
            got = ",".join(sorted(lbl.rstrip("}").split(","))) if lbl else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def reload(self, text: str) -> None:
        """Write a new config and have the running mailward reload it (SIGUSR1)."""
        assert self.mw.proc is not None
        count = self.mw.log().count("configuration reloaded")
        self.mw.write(text)
        self.mw.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30  # a deadline for waiting only
        while self.mw.log().count("configuration reloaded") == count:
            assert time.monotonic() < deadline, "mailward did not reload:\n" + self.mw.log()
            time.sleep(0.02)

    @contextlib.contextmanager
    def configured(self, extra: str) -> Iterator[None]:
        """Run mailward with BASE_CONFIG plus `extra` (later keys of a section win)."""
        self.reload(merge_ini(BASE_CONFIG, extra))
        try:
            yield
        finally:
            self.reload(BASE_CONFIG)


@pytest.fixture(scope="session")
def harness() -> Iterator[Harness]:
    need(os.geteuid() == 0, "the integration tests start a private Postfix and need root")
    missing = missing_tools()
    need(not missing, f"Debian packages missing: apt-get install {' '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="mailward-it-"))
    try:
        with running_lab(BASE_CONFIG, root=root, zone=ZONE) as lab:
            yield Harness(lab.postfix, lab.mailward, lab.sink, lab.dns)
    finally:
        if not os.environ.get("MAILWARD_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_unexpected_log_lines(request: pytest.FixtureRequest) -> Iterator[None]:
    """mailward logs no WARNING, ERROR or traceback unless the test expects it."""
    if "harness" not in request.fixturenames:
        yield
        return
    h: Harness = request.getfixturevalue("harness")
    before = len(h.mw.log())
    yield
    if request.node.get_closest_marker("expect_log_errors"):
        return
    new = h.mw.log()[before:] if len(h.mw.log()) >= before else h.mw.log()
    bad = [ln for ln in new.splitlines()
           if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    assert not bad, "unexpected log lines:\n" + "\n".join(bad)
