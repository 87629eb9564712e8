"""Reload under a stream of mail: no transaction mixes two generations, no window is reset.

Two configurations alternate on SIGUSR1 while messages pass through the real Postfix. They
differ in what a delivered message shows on its own: generation "a" names authserv-id
gen-a.lab.test and resolves through the lab's DNS server, where gen.example's SPF record
passes 127.0.0.1; generation "b" names gen-b.lab.test and resolves through a second DNS server,
where the same record says `?all` (neutral). Each message pauses between RCPT and DATA, so
many transactions span a reload. A message judged with one generation's config and the
other's resolver would carry gen-a with spf=neutral, or gen-b with spf=pass.

Both generations carry the same rate limit; the stream is longer than the limit, so if any
reload reset the in-memory window, more messages than the limit would be accepted.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import merge_ini
from tests.integration.conftest import BASE_CONFIG, Harness

MESSAGES = 36
LIMIT = 30
# Windows are fixed, aligned to the epoch: the longest (a week), so that the stream straddles
# the end of one (which resets the count, as a bad reload would) only if run at that instant.
RATE = f"[check.ratelimit]\nwindow = {7 * 86400}\nlimits = inbound domain messages {LIMIT}\n"


def generation(name: str, dns_port: str) -> str:
    return merge_ini(BASE_CONFIG, f"[milter]\nauthserv_id = gen-{name}.lab.test\n"
                                  f"[dns]\nnameservers = 127.0.0.1:{dns_port}\n{RATE}")


def send_slowly(h: Harness, n: int, outcomes: dict[int, tuple[int, str]]) -> None:
    """One message per connection, with a pause between RCPT and DATA."""
    mid = f"<reload-{n}@gen.example>"
    data = (f"From: x@gen.example\r\nTo: bob@example.net\r\nMessage-ID: {mid}\r\n"
            f"Subject: reload {n}\r\n\r\nHello.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", h.lab.smtp_port, timeout=60) as s:
        s.ehlo("client.example.org")
        code, resp = s.mail("x@gen.example")
        if code != 250:
            outcomes[n] = (code, resp.decode())
            return
        code, resp = s.rcpt("bob@example.net")
        assert code == 250, resp
        time.sleep(0.15)
        code, resp = s.data(data)
        outcomes[n] = (code, resp.decode())


def test_reload_under_load_never_mixes_generations(harness: Harness) -> None:
    h = harness
    other = Nameserver()
    try:
        h.dns.add("gen.example", "TXT", '"v=spf1 ip4:127.0.0.1 -all"')
        other.add("gen.example", "TXT", '"v=spf1 ?all"')
        configs = [generation("a", "{dns_port}"), generation("b", str(other.port))]
        h.reload(configs[0])
        outcomes: dict[int, tuple[int, str]] = {}
        done = threading.Event()

        def stream() -> None:
            try:
                for n in range(MESSAGES):
                    send_slowly(h, n, outcomes)
            finally:
                done.set()

        sender = threading.Thread(target=stream)
        sender.start()
        reloads = 0
        while not done.is_set():
            h.reload(configs[(reloads + 1) % 2])
            reloads += 1
            time.sleep(0.05)
        sender.join()
        accepted = [n for n, (code, _) in outcomes.items() if code == 250]
        refused = [n for n, (code, text) in outcomes.items()
                   if code == 450 and "4.7.1" in text]
        assert len(outcomes) == MESSAGES
        assert (len(accepted), len(refused)) == (LIMIT, MESSAGES - LIMIT), outcomes
        assert sorted(accepted) == list(range(LIMIT))  # the window only grew
        seen = {"a": 0, "b": 0}
        for n in accepted:
            mail = h.arrived(f"<reload-{n}@gen.example>")
            ar = dict(mail.headers())["Authentication-Results"]
            gen = re.match(r"\s*gen-([ab])\.lab\.test;", ar)
            assert gen, ar
            spf = re.search(r"spf=(\w+) smtp\.mailfrom", ar)
            assert spf, ar
            expected = {"a": "pass", "b": "neutral"}[gen.group(1)]
            assert spf.group(1) == expected, f"message {n} mixed generations: {ar}"
            seen[gen.group(1)] += 1
        assert reloads >= 10 and seen["a"] and seen["b"], (reloads, seen)
    finally:
        h.reload(BASE_CONFIG)
        other.close()
