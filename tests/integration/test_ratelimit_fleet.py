"""Two mailward processes behind one Postfix share a rate limit through a real Redis."""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest

from mailward.lab.postfix import LAB_CONFIG, MailwardProcess, merge_ini, missing_tools, running_lab
from tests.conftest import need

pytestmark = pytest.mark.integration


def send(port: int, n: int) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.example.org")
        assert s.docmd("XCLIENT", "LOGIN=alice@example.org")[0] == 220
        s.ehlo("client.example.org")
        code, resp = s.mail("alice@example.org")
        if code != 250:
            return code, resp.decode()
        s.rcpt("bob@example.net")
        code, resp = s.data(f"From: alice@example.org\r\nMessage-ID: <fleet-{n}@x>\r\n\r\n"
                            "hi\r\n".encode())
        return code, resp.decode()


def test_two_milters_share_one_limit(redis_url: str) -> None:
    need(os.geteuid() == 0, "the integration tests start a private Postfix and need root")
    need(not missing_tools(), "Debian's postfix is missing")
    config = merge_ini(LAB_CONFIG, f"[check.ratelimit]\nbackend = redis\nredis_url = {redis_url}"
                                   "\nlimits = outbound user messages 3\n"
                                   # a week (the longest): the end of a window (aligned to
                                   # the epoch) falls between two messages once a week at most
                                   f"window = {7 * 86400}\n")
    root = Path(tempfile.mkdtemp(prefix="mailward-fleet-"))
    second = MailwardProcess(config, root / "second")
    try:
        with running_lab(config, root=root, submission_milter=second.postfix_socket) as lab:
            second.dns_port = lab.dns.port
            second.start()
            try:
                smtp, submission = lab.postfix.smtp_port, lab.postfix.submission_port
                assert [send(smtp, 1)[0], send(smtp, 2)[0], send(submission, 3)[0]] == \
                    [250, 250, 250]
                assert send(submission, 4) == (450, "4.7.1 Rate limit exceeded, try again later")
                assert send(smtp, 5)[0] == 450
                first_log, second_log = lab.mailward.log(), second.log()
                assert first_log.count("verdict=accept") == 2
                assert second_log.count("verdict=accept") == 1
                assert "refused at mail by ratelimit" in second_log
                assert "refused at mail by ratelimit" in first_log
            finally:
                assert second.stop() == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
