"""Faults through the real Postfix: nothing lost, nothing passed unchecked (issue 7).

Mail comes from a second private Postfix (`SenderPostfix`, no milter) that relays to the lab's
MX and, as a sending MTA on the Internet would, keeps what is refused with 4XX and retries it
(every second or two here). Each test breaks one thing mailward depends on while mail flows,
checks in the sender's log that the fault really refused mail (a deferral with the reply that
fault must give), repairs it, and then accounts for every message: delivered to the sink
exactly once (by Message-ID) with our Authentication-Results, `sent` exactly once and never
`bounced` in the sender's log, and both queues empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import (
    Captured,
    SenderPostfix,
    free_port,
    merge_ini,
    missing_tools,
    running_lab,
    wait_for_port,
)
from tests.conftest import need
from tests.integration.conftest import BASE_CONFIG, ZONE, Harness

pytestmark = pytest.mark.integration

# Domains only these tests use, so mailward's DNS cache is cold for them.
FAULT_ZONE = ZONE + """
dnsdown.example.         TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.dnsdown.example.  TXT "v=DMARC1; p=reject"
slowdns.example.         TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.slowdns.example.  TXT "v=DMARC1; p=reject"
"""
DMARC_TEMPFAIL = "451 4.7.5 DMARC policy lookup failed, try again later"
MILTER_DOWN = "451 4.7.1 Service unavailable - try again later"
RATE_TEMPFAIL = "450 4.7.1 Rate limit exceeded, try again later"
ERROR_TEMPFAIL = "451 4.7.0 Temporary failure in message checks, try again later"
WAIT = 60  # seconds: a deadline for waiting, never a claim about speed


def until(done: Callable[[], object], what: Callable[[], str], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what()}"
        time.sleep(0.1)


@dataclass
class Rig(Harness):
    """The lab (Postfix with mailward, sink, DNS) and the sending Postfix in front of it."""

    sender: SenderPostfix

    def submit(self, tag: str, count: int, *, domain: str = "example.org",
               body: bytes = b"Hello.\r\n") -> list[str]:
        """Hand `count` messages from alice@`domain` to the sending Postfix; their ids."""
        mids = [f"<{tag}-{n}@{domain}>" for n in range(count)]
        with smtplib.SMTP("127.0.0.1", self.sender.smtp_port, timeout=30) as s:
            for mid in mids:
                data = (f"From: alice@{domain}\r\nTo: bob@example.net\r\nMessage-ID: {mid}\r\n"
                        f"Subject: {tag}\r\n\r\n").encode() + body
                s.sendmail(f"alice@{domain}", ["bob@example.net"], data)
        return mids

    def reload(self, text: str) -> None:
        """Reload, then wait until no connection judged by the old config is open."""
        super().reload(text)
        until(lambda: self.metric("mailward_connections_active") == 0,
              lambda: "no connection open across the reload")

    def copies(self, mid: str) -> list[Captured]:
        """Every message at the sink with this Message-ID."""
        return [m for m in list(self.sink.messages)
                if mid.encode() in m.data and any(
                    n.lower() == "message-id" and v.strip() == mid for n, v in m.headers())]

    def deferrals(self, mid: str) -> list[str]:
        """The reasons the sending Postfix gave for deferring `mid`."""
        return [why for status, why in self.sender.statuses().get(mid, [])
                if status == "deferred"]

    def wait_deferred(self, mids: list[str], reply: str) -> None:
        """Until each message was refused at least once with `reply`: the fault happened."""
        until(lambda: all(any(reply in why for why in self.deferrals(mid)) for mid in mids),
              lambda: f"{reply!r} for each of "
                      f"{ {mid: self.sender.statuses().get(mid) for mid in mids} }")

    def delivered_once(self, mids: list[str]) -> list[Captured]:
        """Every message delivered exactly once, with our Authentication-Results and SPF and
        DMARC passing, and no copy left in a queue to come later."""
        until(lambda: all(self.copies(mid) for mid in mids)
              and not self.sender.queue() and not self.lab.queue(),
              lambda: f"delivery: {[m for m in mids if not self.copies(m)]} missing, "
                      f"sender queue {self.sender.queue()}, lab queue {self.lab.queue()}")
        statuses = self.sender.statuses()
        out = []
        for mid in mids:
            copies = self.copies(mid)
            assert len(copies) == 1, f"{mid} delivered {len(copies)} times"
            ar = [v for n, v in copies[0].headers() if n == "Authentication-Results"]
            assert len(ar) == 1 and ar[0].strip().startswith("mx.lab.test;"), (mid, ar)
            assert re.search(r"\sspf=pass smtp\.mailfrom=", ar[0]), ar[0]
            assert re.search(r"\sdmarc=pass header\.from=", ar[0]), ar[0]
            seen = [status for status, _ in statuses[mid]]
            assert seen[-1] == "sent" and seen.count("sent") == 1, (mid, seen)
            assert "bounced" not in seen, (mid, seen)
            out.append(copies[0])
        return out

    def threads(self) -> int:
        """mailward's thread count, once no MTA connection is open."""
        until(lambda: self.metric("mailward_connections_active") == 0,
              lambda: "mailward_connections_active 0")
        assert self.mw.proc is not None
        status = Path(f"/proc/{self.mw.proc.pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines()
                        if ln.startswith("Threads:")))


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    need(os.geteuid() == 0, "the integration tests start a private Postfix and need root")
    missing = missing_tools()
    need(not missing, f"Debian packages missing: apt-get install {' '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="mailward-faults-"))
    try:
        with running_lab(BASE_CONFIG, root=root, zone=FAULT_ZONE) as lab:
            sender = SenderPostfix(root / "sender", lab.postfix.smtp_port)
            rig = Rig(lab.postfix, lab.mailward, lab.sink, lab.dns, sender)
            try:
                sender.start()
                yield rig
            finally:
                sender.stop()
                if rig.dns is not lab.dns:  # replaced by a test
                    rig.dns.close()
    finally:
        if not os.environ.get("MAILWARD_KEEP_LAB"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_mailward_log(request: pytest.FixtureRequest, rig: Rig) -> Iterator[None]:
    """No traceback ever; WARNING or ERROR lines only where the test expects them."""
    before = len(rig.mw.log())
    yield
    new = rig.mw.log()[before:]
    assert "Traceback" not in new, new
    if not request.node.get_closest_marker("expect_log_errors"):
        bad = [ln for ln in new.splitlines() if " WARNING " in ln or " ERROR " in ln]
        assert not bad, "unexpected log lines:\n" + "\n".join(bad)


# -- DNS ---------------------------------------------------------------------------------------

@pytest.mark.expect_log_errors  # each SPF and DMARC temperror is logged as a warning
def test_dns_server_down_then_back(rig: Rig) -> None:
    """The lab's DNS server stops: mail from a domain not in the cache is tempfailed and held
    by the sender; a new server on the same port brings every message through."""
    port = rig.dns.port
    tempfailed = {"direction": "inbound", "verdict": "tempfail"}
    tempfails = rig.metric("mailward_messages_total", **tempfailed)
    rig.dns.close()
    mids = rig.submit("dnsdown", 4, domain="dnsdown.example")
    rig.wait_deferred(mids, DMARC_TEMPFAIL)
    assert not any(rig.copies(mid) for mid in mids)
    assert rig.metric("mailward_messages_total", **tempfailed) >= tempfails + len(mids)
    rig.dns = Nameserver(port=port)
    rig.dns.load_zone(FAULT_ZONE)
    rig.delivered_once(mids)


@pytest.mark.expect_log_errors  # each SPF and DMARC temperror is logged as a warning
def test_dns_slower_than_lifetime(rig: Rig) -> None:
    """Answers slower than [dns] lifetime (2 s in the lab) are timeouts: tempfail, retried;
    once DNS is quick again every message passes, and no milter thread is left behind (the
    asyncio engine keeps the worker threads its pool made: one per message waiting at once,
    at most)."""
    baseline = rig.threads()
    timeouts = rig.metric("mailward_dns_queries_total", rtype="TXT", outcome="timeout")
    rig.dns.delay = 3.0
    try:
        mids = rig.submit("slowdns", 4, domain="slowdns.example")
        rig.wait_deferred(mids, DMARC_TEMPFAIL)
        assert not any(rig.copies(mid) for mid in mids)
        assert rig.metric("mailward_dns_queries_total", rtype="TXT",
                          outcome="timeout") >= timeouts + len(mids)
    finally:
        rig.dns.delay = 0.0
    rig.delivered_once(mids)
    pool = 0 if os.environ.get("MAILWARD_TEST_ENGINE") == "libmilter" else len(mids)
    until(lambda: rig.threads() <= baseline + pool,
          lambda: f"mailward back to {baseline} + {pool} threads (has {rig.threads()})")


# -- mailward itself -----------------------------------------------------------------------

def test_mailward_killed_and_restarted(rig: Rig) -> None:
    """SIGKILL while a stream of mail flows: Postfix (milter_default_action = tempfail) holds
    what it cannot have checked, the sender retries, and after the restart every message is
    delivered once, each with our Authentication-Results."""
    mids: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set() and n < 300:
            mids.extend(rig.submit(f"kill-{n}", 1))
            n += 1
            time.sleep(0.1)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        until(lambda: sum(1 for mid in list(mids) if rig.copies(mid)) >= 5,
              lambda: "5 messages through before the kill")
        rig.mw.kill()
        until(lambda: sum(1 for mid in list(mids)
                          if any(MILTER_DOWN in why for why in rig.deferrals(mid))) >= 3,
              lambda: "3 messages held while mailward is down")
        rig.mw.start()
        restarted = len(mids)
        until(lambda: len(mids) >= restarted + 3
              and all(rig.copies(mid) for mid in mids[restarted:restarted + 3]),
              lambda: "3 messages through after the restart")
    finally:
        stop.set()
        sender.join()
    delivered = rig.delivered_once(mids)
    assert len(delivered) == len(mids) >= 11
    held = [mid for mid in mids if any(MILTER_DOWN in why for why in rig.deferrals(mid))]
    assert len(held) >= 3, held


# -- Redis ---------------------------------------------------------------------------------

class RedisServer:
    """A private redis-server on 127.0.0.1 that a test may stop and start on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need(shutil.which("redis-server") is not None,
         "redis-server is missing: apt-get install redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ratelimit(url: str, on_error: str) -> str:
    return merge_ini(BASE_CONFIG, f"[check.ratelimit]\nbackend = redis\nredis_url = {url}\n"
                                  f"limits = inbound domain messages 1000\n"
                                  f"on_backend_error = {on_error}\n")


@pytest.mark.expect_log_errors  # the ratelimit temperror warning is what fail-open says
def test_redis_down_fails_open(rig: Rig, redis_server: RedisServer) -> None:
    """With on_backend_error = accept, mail passes while Redis is down, and says so."""
    rig.reload(ratelimit(redis_server.url, "accept"))
    errors = rig.metric("mailward_ratelimit_backend_errors_total")
    log_before = len(rig.mw.log())
    redis_server.stop()
    try:
        mids = rig.submit("redisopen", 3)
        rig.delivered_once(mids)
        assert all(not rig.deferrals(mid) for mid in mids)  # passed at the first attempt
        assert rig.metric("mailward_ratelimit_backend_errors_total") >= errors + len(mids)
        log = rig.mw.log()[log_before:]
        assert log.count("check ratelimit temperror at mail") >= len(mids), log
        assert "(fail open)" in log, log
    finally:
        redis_server.start()
        rig.reload(BASE_CONFIG)


@pytest.mark.expect_log_errors  # the ratelimit temperror warning
def test_redis_down_fails_closed(rig: Rig, redis_server: RedisServer) -> None:
    """With on_backend_error = tempfail, mail waits at the sender until Redis is back, and is
    then counted there."""
    rig.reload(ratelimit(redis_server.url, "tempfail"))
    redis_server.stop()
    try:
        mids = rig.submit("redisclosed", 3)
        rig.wait_deferred(mids, RATE_TEMPFAIL)
        assert not any(rig.copies(mid) for mid in mids)
        redis_server.start()  # the same port, empty
        rig.delivered_once(mids)
        with redis.Redis(port=redis_server.port) as client:
            assert client.keys("mailward:rl:*"), "the delivered messages were not counted"
    finally:
        if redis_server.proc is None:
            redis_server.start()
        rig.reload(BASE_CONFIG)


# -- the spool -----------------------------------------------------------------------------

@pytest.mark.expect_log_errors  # "cannot spool the body" is the error this test provokes
def test_spool_disk_full(rig: Rig, tmp_path: Path) -> None:
    """A body larger than the spool's free space is tempfailed, never judged from the part
    that fitted; once there is room, the sender's retry delivers it whole."""
    need(shutil.which("mount") is not None, "mount is missing")
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(spool)],
                   check=True)
    try:
        rig.reload(merge_ini(BASE_CONFIG, f"[milter]\nspool_dir = {spool}\n"
                                          "spool_threshold = 64K\n"))
        inbound = {"direction": "inbound", "verdict": "accept"}
        accepted = rig.metric("mailward_messages_total", **inbound)
        log_before = len(rig.mw.log())
        body = b"".join(b"%07d %s\r\n" % (n, hashlib.sha256(b"%d" % n).hexdigest().encode())
                        for n in range(30_000))  # 2.2 MB, more than the 1 MB disk
        [mid] = rig.submit("spool", 1, body=body)
        rig.wait_deferred([mid], ERROR_TEMPFAIL)
        assert not rig.copies(mid)
        assert rig.metric("mailward_messages_total", **inbound) == accepted
        assert "cannot spool the body ([Errno 28] No space left on device)" in \
            rig.mw.log()[log_before:]
        subprocess.run(["mount", "-o", "remount,size=16m", str(spool)], check=True)
        [copy] = rig.delivered_once([mid])
        got = copy.data.split(b"\r\n\r\n", 1)[1]
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()
    finally:
        rig.reload(BASE_CONFIG)
        subprocess.run(["umount", "-l", str(spool)], check=False)


# -- stopping ------------------------------------------------------------------------------

STOPPING = "421 4.3.2 Service shutting down, try again later"


class HeldOpen:
    """A message from a client of our own, stopped half-way through DATA: in flight."""

    def __init__(self, rig: Rig, tag: str) -> None:
        self.mid = f"<{tag}@example.org>"
        self.smtp = smtplib.SMTP("127.0.0.1", rig.lab.smtp_port, timeout=60)
        self.smtp.ehlo("client.example.org")
        assert self.smtp.mail("alice@example.org")[0] == 250
        assert self.smtp.rcpt("bob@example.net")[0] == 250
        self.smtp.putcmd("DATA")
        assert self.smtp.getreply()[0] == 354
        self.smtp.send(f"From: alice@example.org\r\nTo: bob@example.net\r\n"
                       f"Message-ID: {self.mid}\r\nSubject: {tag}\r\n\r\n".encode())

    def finish(self) -> tuple[int, str]:
        self.smtp.send(b"The rest of the body.\r\n.\r\n")
        code, text = self.smtp.getreply()
        self.smtp.close()
        return code, text.decode()


def sigterm(rig: Rig) -> None:
    """SIGTERM, then wait until mailward has started stopping."""
    assert rig.mw.proc is not None
    rig.mw.proc.send_signal(signal.SIGTERM)
    until(lambda: "stopping: " in rig.mw.log(), lambda: "mailward to start stopping")


def exited(rig: Rig, timeout: float) -> int:
    assert rig.mw.proc is not None
    rc = rig.mw.proc.wait(timeout)
    rig.mw.stop()
    return rc


def test_sigterm_lets_transactions_in_flight_finish(rig: Rig) -> None:
    """SIGTERM while mail flows: a message in the middle of DATA is still judged and
    delivered, a new transaction on an open connection gets 421 (the client retries), mail
    arriving while mailward is stopped waits in the sender's queue (milter_default_action),
    and after the restart every message is delivered once, with our Authentication-Results."""
    rig.reload(merge_ini(BASE_CONFIG, "[milter]\nstop_grace = 30\n"))
    log_before = len(rig.mw.log())
    mids: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set() and n < 300:
            mids.extend(rig.submit(f"term-{n}", 1))
            n += 1
            time.sleep(0.1)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        until(lambda: sum(1 for mid in list(mids) if rig.copies(mid)) >= 5,
              lambda: "5 messages through before the stop")
        held = HeldOpen(rig, "inflight-term")
        idle = smtplib.SMTP("127.0.0.1", rig.lab.smtp_port, timeout=60)
        idle.ehlo("client.example.org")
        started = time.monotonic()
        sigterm(rig)
        code, text = idle.mail("alice@example.org")
        idle.close()
        assert f"{code} {text.decode()}" == STOPPING
        time.sleep(1)  # mailward is waiting for the message in flight ...
        assert rig.mw.proc is not None and rig.mw.proc.poll() is None
        assert held.finish()[0] == 250  # ... which is judged and queued
        assert exited(rig, 30) == 0
        assert time.monotonic() - started < 30
        until(lambda: sum(1 for mid in list(mids)
                          if any(MILTER_DOWN in why or STOPPING in why
                                 for why in rig.deferrals(mid))) >= 3,
              lambda: "3 messages held while mailward is stopped")
        rig.mw.start()
        restarted = len(mids)
        until(lambda: len(mids) >= restarted + 3
              and all(rig.copies(mid) for mid in mids[restarted:restarted + 3]),
              lambda: "3 messages through after the restart")
    finally:
        stop.set()
        sender.join()
        rig.reload(BASE_CONFIG)
    delivered = rig.delivered_once(mids)
    assert len(delivered) == len(mids) >= 11
    [copy] = rig.copies(held.mid)
    ar = [v for n, v in copy.headers() if n == "Authentication-Results"]
    assert len(ar) == 1 and "dmarc=pass" in ar[0], ar
    log = rig.mw.log()[log_before:]
    # the held message, and perhaps one of the stream's caught in the middle too
    in_flight = re.search(r"stopping: (\d+) transaction\(s\) in flight", log)
    assert in_flight is not None and int(in_flight.group(1)) >= 1, log
    assert "stopping: no transaction in flight" in log, log


@pytest.mark.expect_log_errors  # the warning that a transaction was cut
def test_sigterm_cuts_what_outlasts_the_grace_period(rig: Rig) -> None:
    """A transaction still open when stop_grace runs out is cut: Postfix tempfails it
    (milter_default_action), so it is never delivered unchecked."""
    rig.reload(merge_ini(BASE_CONFIG, "[milter]\nstop_grace = 1\n"))
    try:
        held = HeldOpen(rig, "inflight-grace")
        started = time.monotonic()
        sigterm(rig)
        assert exited(rig, 30) == 0
        took = time.monotonic() - started
        code, text = held.finish()
        assert f"{code} {text}" == MILTER_DOWN
        assert rig.not_arrived(held.mid)
        assert "stopping with 1 transaction(s) still open after 1." in rig.mw.log()
        assert took >= 1
    finally:
        if rig.mw.proc is None:
            rig.mw.start()
        rig.reload(BASE_CONFIG)
