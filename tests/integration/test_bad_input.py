"""Bad input through the real Postfix: every message gets a defined answer, nothing is lost,
memory stays bounded and the milter keeps serving other connections."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.integration.conftest import Harness

pytestmark = pytest.mark.integration


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_thousand_headers(harness: Harness) -> None:
    many = "".join(f"X-Filler-{i}: value {i}\r\n" for i in range(1000))
    mid, data = harness.message(many + "Bcc: x@example.org\r\n")
    assert harness.send(data).code == 250
    headers = harness.arrived(mid).headers()
    assert len([n for n, _ in headers if n.startswith("X-Filler-")]) == 1000
    assert "Bcc" not in dict(headers)


def test_more_header_fields_than_max_header_fields(harness: Harness) -> None:
    """Ten thousand tiny fields besides From, To, Message-ID and Subject: refused as a whole,
    with a reason."""
    many = "".join(f"X-{i}: v\r\n" for i in range(10_000))
    mid, data = harness.message(many)
    outcome = harness.send(data)
    assert (outcome.stage, outcome.code) == ("data", 552), outcome
    assert "5.3.4 Message header has too many fields" in outcome.text
    assert harness.not_arrived(mid)
    assert "more than [milter] max_header_fields (10000)" in harness.mw.log()


def test_header_line_of_100_kb(harness: Harness) -> None:
    mid, data = harness.message("X-Long: " + "a" * 100_000 + "\r\nBcc: x@example.org\r\n")
    assert harness.send(data).code == 250
    got = harness.arrived(mid)
    assert "Bcc" not in dict(got.headers())


def test_nul_and_non_utf8_bytes_and_no_from(harness: Harness) -> None:
    mid, data = harness.message("X-Latin1: caf\udce9 \udcff\r\nX-Nul: a\x00b\r\n",
                                body="caf\udce9\x00\r\n")
    data = data.replace(b"From: alice@example.org\r\n", b"")
    assert harness.send(data).code == 250
    got = harness.arrived(mid)
    headers = got.headers()
    assert headers[0][0] == "Authentication-Results"
    assert ("X-Latin1", " caf\udce9 \udcff") in headers  # the bytes pass through unchanged
    # Postfix adds a From after the milters ran; mailward saw none and still accepted
    assert headers[-1][0] == "From"
    qid = got.headers()[1][1].split(" id ")[1].split()[0]
    assert f"qid={qid} " in harness.mw.log() and "verdict=accept" in harness.mw.log()


def test_50_mb_body_with_bounded_memory_while_serving_others(harness: Harness) -> None:
    assert harness.mw.proc is not None
    pid = harness.mw.proc.pid
    line = "0123456789" * 9 + "\r\n"  # 92-byte lines
    big_mid, big = harness.message(body=line * (50 * 1024 * 1024 // len(line)))
    assert len(big) > 50 * 1024 * 1024
    result: dict[str, int] = {}

    def send_big() -> None:
        result["code"] = harness.send(big).code

    before = peak_rss_kib(pid)
    sender = threading.Thread(target=send_big)
    sender.start()
    small_mid, small = harness.message()
    assert harness.send(small).code == 250  # served while the big one streams
    harness.arrived(small_mid)
    sender.join(300)
    assert result == {"code": 250}
    assert len(harness.arrived(big_mid, timeout=120).data) > 50 * 1024 * 1024
    grown = peak_rss_kib(pid) - before
    # the body is spooled to disk past 256K: peak memory must not grow with the body
    assert grown < 20 * 1024, f"peak RSS grew by {grown} KiB"


def test_connection_dropped_mid_data(harness: Harness) -> None:
    with socket.create_connection(("127.0.0.1", harness.lab.smtp_port), timeout=30) as s:
        f = s.makefile("rwb")

        def cmd(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert f.readline().startswith(b"220")
        assert cmd(b"EHLO client.example.org").startswith(b"250")
        assert cmd(b"MAIL FROM:<alice@example.org>").startswith(b"250")
        assert cmd(b"RCPT TO:<bob@example.net>").startswith(b"250")
        assert cmd(b"DATA").startswith(b"354")
        f.write(b"From: alice@example.org\r\nSubject: cut off\r\n\r\nhalf a bo")
        f.flush()
    # the next connection is served normally
    mid, data = harness.message()
    assert harness.send(data).code == 250
    harness.arrived(mid)
    assert harness.metric("mailward_connections_active") <= 1
