"""`mailward reports build`: destinations (external ones verified), size limits, refusals to
send what would not pass DMARC, and a relay that fails."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from mailward.core.config import Config
from mailward.errors import MailwardError
from mailward.lab.dns import Nameserver
from mailward.lab.postfix import CaptureSink, free_port
from mailward.reports.build import destinations
from mailward.reports.commands import run_build
from mailward.services import keys
from mailward.services.dns import DnsSettings, Resolver
from mailward.services.reportstore import MessageRecord, SqliteStore
from tests.conftest import loads


def test_destinations(nameserver: Nameserver) -> None:
    nameserver.add("example.org._report._dmarc.collector.example", "TXT", '"v=DMARC1"')
    nameserver.servfail.add("example.org._report._dmarc.broken.example")
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", nameserver.port),),
                                    cache_size=0))
    found = destinations("example.org", "mailto:d@example.org!10m, mailto:r@sub.example.org,"
                         "mailto:x@collector.example,mailto:y@elsewhere.example,"
                         "https://example.org/r,mailto:not an address,"
                         "mailto:z@broken.example", resolver)
    assert [(d.address, d.problem.split(":")[0]) for d in found] == [
        ("d@example.org", ""),  # the obsolete !size suffix is ignored
        ("r@sub.example.org", ""),  # same Organizational Domain: no verification needed
        ("x@collector.example", ""),  # verified
        ("", "external destination not verified"),
        ("", "not a mailto"),
        ("", "not a mail address"),
        ("", "cannot verify example.org._report._dmarc.broken.example")]


def config(tmp_path: Path, nameserver: Nameserver, extra: str = "",
           sender: str = "dmarc@reports.example") -> Config:
    path = tmp_path / "reports.example.s.key"
    key = keys.load_key(str(path), domain="reports.example", selector="s") if path.exists() \
        else keys.generate(domain="reports.example", selector="s", directory=str(tmp_path))
    return loads(f"[milter]\nauthserv_id = mx.example.net\n[dns]\nnameservers = "
                 f"127.0.0.1:{nameserver.port}\n[check.dkim_sign]\nkeys = reports.example s "
                 f"{key.path}\n[reports]\nsqlite_path = {tmp_path / 'r.sqlite'}\n"
                 f"sender = {sender}\n{extra}")


def fill(tmp_path: Path, n: int = 3) -> None:
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    now = int(time.time())
    store.add_messages([MessageRecord(now, "example.org", "example.org", "example.org",
                                      f"192.0.2.{i}", "pass", "pass", "pass",
                                      policy=(("p", "reject"), ("rua", "mailto:d@example.org")))
                        for i in range(n)])
    store.close()


def test_a_relay_that_fails_is_reported_and_recorded(tmp_path: Path,
                                                     nameserver: Nameserver) -> None:
    fill(tmp_path)
    cfg = config(tmp_path, nameserver, f"relay = 127.0.0.1:{free_port()}\n")
    out = io.StringIO()
    assert run_build(cfg, period="today", out="", send=True, out_stream=out) == 1
    assert "d@example.org: failed: relay 127.0.0.1:" in out.getvalue()
    store = SqliteStore(str(tmp_path / "r.sqlite"))
    assert store.sent_counts() == (1, {"failed": 1})


def test_a_report_over_the_size_limit_is_not_sent(tmp_path: Path,
                                                  nameserver: Nameserver) -> None:
    fill(tmp_path, 200)
    cfg = config(tmp_path, nameserver, "max_report_size = 1K\n")
    out = io.StringIO()
    assert run_build(cfg, period="today", out=str(tmp_path / "o"), send=True,
                     out_stream=out) == 0
    assert "over max_report_size (1024)" in out.getvalue()
    assert SqliteStore(str(tmp_path / "r.sqlite")).sent_counts() == (1, {"skipped": 1})


def test_report_mail_that_would_fail_dmarc_is_not_sent(tmp_path: Path,
                                                       nameserver: Nameserver) -> None:
    fill(tmp_path)
    cfg = config(tmp_path, nameserver, sender="dmarc@unsigned.example")
    with pytest.raises(MailwardError, match=r"no \[check\.dkim_sign\] key for unsigned\.example"):
        run_build(cfg, period="today", out="", send=True, out_stream=io.StringIO())
    cfg = config(tmp_path, nameserver, sender="")
    with pytest.raises(MailwardError, match="sender: needed to send"):
        run_build(cfg, period="today", out="", send=True, out_stream=io.StringIO())


def test_a_relay_without_starttls_gets_nothing_when_tls_is_required(
        tmp_path: Path, nameserver: Nameserver) -> None:
    fill(tmp_path)
    sink = CaptureSink()
    try:
        cfg = config(tmp_path, nameserver, f"relay = 127.0.0.1:{sink.port}\n"
                     "relay_tls = require\n")
        out = io.StringIO()
        assert run_build(cfg, period="today", out="", send=True, out_stream=out) == 1
        assert "offers no STARTTLS (relay_tls = require)" in out.getvalue()
        assert sink.messages == []
        # with may, it goes in clear text to a relay that offers nothing better
        cfg = config(tmp_path, nameserver, f"relay = 127.0.0.1:{sink.port}\n")
        assert run_build(cfg, period="today", out="", send=True, out_stream=out) == 0
        [mail] = sink.messages
        assert mail.rcpts == ["d@example.org"] and b"DKIM-Signature:" in mail.data
    finally:
        sink.close()


def test_a_relay_that_wants_auth(tmp_path: Path, nameserver: Nameserver) -> None:
    sink = CaptureSink(auth=("reports", "s3cret"))
    try:
        outs = []
        for password in ("wrong", "s3cret"):
            where = tmp_path / password
            where.mkdir()
            fill(where)
            secret = where / "relay.password"
            secret.write_text(password + "\n")
            cfg = config(where, nameserver, f"relay = 127.0.0.1:{sink.port}\n"
                         f"relay_user = reports\nrelay_password_file = {secret}\n")
            out = io.StringIO()
            outs.append((run_build(cfg, period="today", out="", send=True, out_stream=out),
                         out.getvalue()))
        (wrong, said), (right, _) = outs
        assert wrong == 1 and "535 5.7.8 Authentication credentials invalid" in said
        assert "wrong" not in said.replace("wrong/", "")  # the password is never shown
        assert right == 0
        assert [m.rcpts for m in sink.messages] == [["d@example.org"]]
    finally:
        sink.close()
