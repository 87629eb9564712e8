"""The adapter, driven through pymilter's own test context (no socket, real callbacks)."""

from __future__ import annotations

import io
import socket
import tempfile
from typing import Any

import Milter
import pytest
from Milter import testctx

from mailward.adapter import milter as adapter
from mailward.adapter.drain import Drain
from mailward.adapter.milter import MailwardMilter
from mailward.core.config import Config
from mailward.core.snapshot import build
from mailward.services.metrics import Metrics
from tests.conftest import make_config

CONFIG = """
[milter]
authserv_id = mx.example.com
trusted_networks = 10.0.0.0/8
spool_threshold = 4K
[check.tls]
require_domains = secure.example
"""


class Runtime:
    def __init__(self, config: Config) -> None:
        self.metrics = Metrics()
        self.snapshot = build(config, metrics=self.metrics)
        self.drain = Drain()
        self.reports = None


class RecordingCtx(testctx.TestCtx):  # type: ignore[misc]
    """TestCtx that records header operations by index and quarantine, as the MTA sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, ...]] = []
        self.quarantined: str | None = None

    def _negotiate(self) -> int:
        # TestCtx takes NOREPLY for a refusal and detaches; offer no NR_* bits, as an MTA
        # without them would (Postfix offers them; the callbacks then return NOREPLY).
        nr = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
              | Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY
              | Milter.P_NR_HDR)
        testctx.TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~nr, 0, 0]
        return int(super()._negotiate())

    def addheader(self, field: str, value: str, idx: int) -> None:
        self.ops.append(("add", field, value, idx))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        self.ops.append(("chg", field, idx, value))

    def quarantine(self, reason: str) -> None:
        self.quarantined = reason


def session(config: str = CONFIG, runtime_cls: type = MailwardMilter
            ) -> tuple[RecordingCtx, Runtime]:
    runtime = Runtime(make_config(config))
    Milter.factory = lambda: runtime_cls(runtime)
    ctx = RecordingCtx()
    return ctx, runtime


def feed(ctx: RecordingCtx, message: bytes, *, ip: str = "203.0.113.5", tls: str = "",
         rcpts: tuple[str, ...] = ("bob@example.net",)) -> int:
    ctx._setsymval("{daemon_name}", "smtpd")
    assert ctx._connect(host="client.example", helo="client.example", ip=ip) == Milter.CONTINUE
    if tls:
        ctx._setsymval("{tls_version}", tls)
        ctx._setsymval("{cipher}", "TLS_AES_128_GCM_SHA256")
    ctx._setsymval("i", "ABC123")
    rc: int = ctx._feedFile(io.BytesIO(message), "alice@example.org", *rcpts)
    return rc


MESSAGE = (b"From: alice@example.org\nTo: bob@example.net\nBcc: secret@example.org\n"
           b"Authentication-Results: mx.example.com; spf=pass\nSubject: hi\n\nbody\n")


def test_edits_are_applied_by_index_with_leading_space() -> None:
    ctx, runtime = session()
    assert feed(ctx, MESSAGE, tls="TLSv1.3") == Milter.ACCEPT
    assert ctx.ops == [
        ("chg", "Authentication-Results", 1, ""),
        ("chg", "Bcc", 1, ""),
        ("add", "Authentication-Results",
         " mx.example.com;\n\tx-tls=pass smtp.version=TLSv1.3 "
         "smtp.cipher=TLS_AES_128_GCM_SHA256", 0),
    ]
    text = runtime.metrics.registry.get_sample_value
    assert text("mailward_messages_total", {"direction": "inbound", "verdict": "accept"}) == 1
    assert text("mailward_check_results_total", {"check": "bcc", "result": "pass"}) == 1


def test_recipient_refused_before_data() -> None:
    ctx, runtime = session()
    rc = feed(ctx, MESSAGE, rcpts=("carol@secure.example",))
    assert rc == Milter.REJECT
    assert ctx._reply == ("530", "5.7.0", "Must issue a STARTTLS command first")
    assert runtime.metrics.registry.get_sample_value(
        "mailward_recipients_rejected_total", {"check": "tls"}) == 1


def test_quarantine_with_reason() -> None:
    ctx, _ = session(CONFIG + "min_version = TLSv1.3\nversion_action = quarantine\n")
    assert feed(ctx, MESSAGE, tls="TLSv1.2", rcpts=("carol@secure.example",)) == Milter.ACCEPT
    assert ctx.quarantined == "tls: TLSv1.2 is older than TLSv1.3 (TLS required)"


def test_percent_in_reply_is_escaped_for_libmilter() -> None:
    ctx, _ = session(CONFIG + "reply = 530 5.7.0 100% TLS please\n")
    assert feed(ctx, MESSAGE, rcpts=("carol@secure.example",)) == Milter.REJECT
    assert ctx._reply == ("530", "5.7.0", "100%% TLS please")


class Broken(MailwardMilter):
    def _observe(self, *args: object) -> None:
        raise RuntimeError("bug in the adapter")


def test_unexpected_error_tempfails_and_is_counted() -> None:
    ctx, runtime = session(runtime_cls=Broken)
    assert feed(ctx, MESSAGE) == Milter.TEMPFAIL
    assert ctx._reply == ("451", "4.7.0", "Temporary failure in message checks, try again later")
    assert runtime.metrics.registry.get_sample_value(
        "mailward_errors_total", {"stage": "mail"}) == 1


def test_big_and_odd_messages_get_a_verdict() -> None:
    ctx, _ = session()
    many = b"".join(b"X-Filler-%d: %d\n" % (i, i) for i in range(1000))
    long_line = b"X-Long: " + b"a" * 100_000 + b"\n"
    odd = b"X-Latin1: caf\xe9 \xff\xfe\nX-Nul: a\x00b\n"
    body = b"line\n" * 200_000  # 1 MB, spooled past the 4K threshold
    msg = b"Subject: no From at all\n" + many + long_line + odd + b"Bcc: x@y\n\n" + body
    assert feed(ctx, msg) == Milter.ACCEPT
    assert ("chg", "Bcc", 1, "") in ctx.ops


def test_body_is_spooled_to_disk_past_threshold() -> None:
    seen: dict[str, object] = {}

    class Spy(MailwardMilter):
        def eom(self) -> int:
            seen["on_disk"] = self.spool.on_disk if self.spool else None
            seen["size"] = self.spool.size if self.spool else None
            return int(super().eom())

    ctx, _ = session(runtime_cls=Spy)
    assert feed(ctx, MESSAGE.replace(b"body\n", b"x" * 10_000 + b"\n")) == Milter.ACCEPT
    assert seen == {"on_disk": True, "size": 10_001}


def test_full_spool_disk_tempfails_at_end_of_message(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A body that cannot be spooled is never judged: 451 at end of message, one error line
    (no traceback), no verdict. /dev/full answers every write with ENOSPC, as a full disk."""
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: open("/dev/full", "w+b"))
    ctx, runtime = session()
    body = b"x" * 100 + b"\n"
    assert feed(ctx, MESSAGE.replace(b"body\n", body * 500)) == Milter.TEMPFAIL  # 4K spooled
    assert ctx._reply == ("451", "4.7.0", "Temporary failure in message checks, try again later")
    value = runtime.metrics.registry.get_sample_value
    assert value("mailward_errors_total", {"stage": "body"}) == 1  # not once per chunk
    inbound = {"direction": "inbound", "verdict": "accept"}
    assert value("mailward_messages_total", inbound) == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        "qid=ABC123 cannot spool the body ([Errno 28] No space left on device): message "
        "tempfailed"]
    assert errors[0].exc_info is None


@pytest.mark.parametrize("tls", ["", "TLSv1.3"])
def test_connection_gauge_returns_to_zero(tls: str) -> None:
    ctx, runtime = session()
    feed(ctx, MESSAGE, tls=tls)
    ctx._close()
    assert runtime.metrics.registry.get_sample_value("mailward_connections_active") == 0


def test_nodelay_is_set_on_listening_tcp_sockets() -> None:
    with socket.socket() as listener, socket.socket() as idle:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert adapter._nodelay_listeners() >= 1
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert idle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # not listening
        # and a connection accepted afterwards inherits it (Linux)
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            client.close()


def test_header_values_reach_pymilter_as_utf8_text() -> None:
    assert adapter._utf8(" caf\u00e9 \u2014 ok") == " caf\u00e9 \u2014 ok"  # valid: unchanged
    assert adapter._utf8(" caf\udce9") == " caf\ufffd"  # an undecoded byte: replaced
    adapter._utf8(" caf\udce9").encode("utf-8")  # and it encodes, where the raw one raises
    with pytest.raises(UnicodeEncodeError):
        " caf\udce9".encode("utf-8")


def test_transactions_are_counted_until_they_end() -> None:
    """A transaction is open from an accepted MAIL FROM to end of message, abort or close; a
    refused MAIL FROM opens none. A graceful stop waits for exactly these."""
    ctx, runtime = session()
    assert feed(ctx, MESSAGE) == Milter.ACCEPT
    assert runtime.drain.open == 0
    ctx._setsymval("{daemon_name}", "smtpd")
    assert ctx._connect(host="client.example", helo="client.example",
                        ip="203.0.113.5") == Milter.CONTINUE
    assert ctx._envfrom("<alice@example.org>") == Milter.CONTINUE
    assert runtime.drain.open == 1
    assert ctx._envrcpt("<bob@example.net>") == Milter.CONTINUE
    ctx._abort()
    assert runtime.drain.open == 0
    ctx._connect(host="client.example", helo="client.example", ip="203.0.113.5")
    assert ctx._envfrom("<alice@example.org>") == Milter.CONTINUE
    assert runtime.drain.open == 1
    ctx._close()
    assert runtime.drain.open == 0
    limited, runtime = session(CONFIG + "[policy]\nchecks = tls, ratelimit\n"
                               "[check.ratelimit]\nlimits = inbound domain messages 1\n")
    assert feed(limited, MESSAGE) == Milter.ACCEPT
    limited._setsymval("{daemon_name}", "smtpd")
    limited._connect(host="client.example", helo="client.example", ip="203.0.113.5")
    assert limited._envfrom("<alice@example.org>") == Milter.TEMPFAIL
    assert runtime.drain.open == 0


def test_new_transactions_get_421_once_stopping() -> None:
    ctx, runtime = session()
    ctx._setsymval("{daemon_name}", "smtpd")
    assert ctx._connect(host="client.example", helo="client.example",
                        ip="203.0.113.5") == Milter.CONTINUE
    assert ctx._envfrom("<alice@example.org>") == Milter.CONTINUE
    runtime.drain.close()
    # the open transaction goes on to its verdict ...
    assert ctx._envrcpt("<bob@example.net>") == Milter.CONTINUE
    assert ctx._eom() == Milter.ACCEPT
    assert runtime.drain.open == 0
    # ... the next one is refused, and does not count
    assert ctx._envfrom("<alice@example.org>") == Milter.TEMPFAIL
    assert ctx._reply == ("421", "4.3.2", "Service shutting down, try again later")
    assert runtime.drain.open == 0


@pytest.mark.parametrize(("extra", "rc"), [(95, Milter.ACCEPT), (96, Milter.REJECT)])
def test_more_header_fields_than_the_limit_is_refused(extra: int, rc: int) -> None:
    """MESSAGE has 5 fields: 100 in all are judged; one more is refused, as a whole,
    without the chain judging a message it has not seen all of."""
    ctx, runtime = session(CONFIG.replace("[milter]\n", "[milter]\nmax_header_fields = 100\n"))
    fields = b"".join(b"X-F%d: v\n" % i for i in range(extra))
    message = MESSAGE.replace(b"Subject: hi\n", fields + b"Subject: hi\n")
    assert feed(ctx, message, tls="TLSv1.3") == rc
    sample = runtime.metrics.registry.get_sample_value
    if rc == Milter.REJECT:
        assert ctx._reply == ("552", "5.3.4", "Message header has too many fields")
        assert ctx.ops == []  # no header edits: nothing was judged
        assert sample("mailward_messages_total",
                      {"direction": "inbound", "verdict": "reject"}) == 1
    else:
        assert sample("mailward_messages_total",
                      {"direction": "inbound", "verdict": "accept"}) == 1
    # the next message on the connection starts from nothing
    assert ctx._feedFile(io.BytesIO(MESSAGE), "alice@example.org", "bob@example.net") \
        == Milter.ACCEPT


def test_header_fields_past_the_limit_are_not_kept() -> None:
    _, runtime = session(CONFIG.replace("[milter]\n", "[milter]\nmax_header_fields = 100\n"))
    milter = MailwardMilter(runtime)
    milter._setctx(None)
    for i in range(5000):
        milter.header(f"X-{i}", " v")
    assert (len(milter.headers), milter.fields_over) == (100, 4900)


@pytest.mark.parametrize(("timeout", "whole"), [(0.4, 1), (1.6, 2), (60.0, 60)])
def test_libmilter_gets_whole_seconds_never_zero(monkeypatch: pytest.MonkeyPatch,
                                                 timeout: float, whole: int) -> None:
    """libmilter's timeout is whole seconds; 0 would be its two-hour default."""
    given: dict[str, Any] = {}
    monkeypatch.setattr(adapter, "serve", lambda runtime, **kw: given.update(kw))
    adapter.Libmilter(None, socket="unix:/nonexistent", timeout=timeout).serve()  # type: ignore[arg-type]
    assert given["timeout"] == whole
