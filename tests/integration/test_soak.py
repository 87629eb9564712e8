"""Soak: a mixed stream through the real Postfix at 50 sessions, with exact accounting.

2,000 messages here; `make soak` sends 20,000 (MAILWARD_SOAK=20000). Five kinds, in equal
parts, in SMTP sessions of one to three messages of one kind:
  pass        DKIM-signed, SPF-authorized mail from example.org (p=reject), over TLS or not
  outbound    unsigned mail from example.org on the submission port: mailward signs it
  spoof       From a p=reject domain that did not send it: 550 at end of data
  quarantine  From a p=quarantine domain that did not send it: accepted into the hold queue
  plaintext   to a domain that requires TLS, without STARTTLS: 530 at RCPT
Every message has its own Message-ID and recipient. At the end, every message must be
accounted for exactly once, in the way its kind prescribes: delivered (once, with our
Authentication-Results and the expected results), refused with the expected code and text, or
held; nothing else, nothing twice.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import smtplib
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest

from mailward.lab.postfix import Lab, merge_ini, missing_tools, running_lab
from mailward.services import keys
from tests.conftest import need
from tests.integration.conftest import BASE_CONFIG, ZONE

COUNT = int(os.environ.get("MAILWARD_SOAK", "2000"))
SESSIONS = 50
KINDS = ("pass", "outbound", "spoof", "quarantine", "plaintext")
SPOOF_TEXT = ("5.7.1 Rejected by the DMARC policy of the sender domain spoofed.example "
              "(p=reject)")
TLS_TEXT = "5.7.0 Must issue a STARTTLS command first"


@dataclass(frozen=True)
class Session:
    kind: str
    ids: tuple[int, ...]
    tls: bool


def plan(count: int) -> list[Session]:
    """Sessions of 1 to 3 messages of one kind; kinds in equal parts, interleaved."""
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for i in range(count):
        by_kind[KINDS[i % len(KINDS)]].append(i)
    sessions = []
    for kind, ids in by_kind.items():
        k = 0
        while k < len(ids):
            size = 1 + (k // 7) % 3
            tls = kind == "outbound" or (kind != "plaintext" and (k // 3) % 2 == 0)
            sessions.append(Session(kind, tuple(ids[k:k + size]), tls))
            k += size
    sessions.sort(key=lambda s: s.ids[0])
    return sessions


class Soak:
    def __init__(self, lab: Lab, key: keys.SigningKey) -> None:
        self.lab = lab
        self.key = key
        self.replies: dict[int, tuple[str, int, str]] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def message(self, kind: str, i: int) -> tuple[str, str, bytes]:
        """(envelope sender, recipient, message) for message `i` of `kind`."""
        author = {"spoof": "ceo@spoofed.example", "quarantine": "billing@held.example"}.get(
            kind, "alice@example.org")
        rcpt = f"r{i}@secure.example" if kind == "plaintext" else f"r{i}@example.net"
        data = (f"From: {author}\r\nTo: {rcpt}\r\nSubject: soak {i} ({kind})\r\n"
                f"Message-ID: <soak-{i}@example.org>\r\nDate: Thu, 03 Dec 2026 08:00:00 +0000\r\n"
                f"\r\nMessage {i} of the soak.\r\n" + "Some body text.\r\n" * (i % 40))
        raw = data.encode()
        if kind == "pass":
            raw = dkimpy.sign(raw, self.key.selector.encode(), self.key.domain.encode(),
                              self.key.material, signature_algorithm=self.key.algorithm,
                              include_headers=[b"from", b"to", b"subject", b"message-id"]) + raw
        return "alice@example.org", rcpt, raw

    def run_session(self, s: Session) -> None:
        port = (self.lab.postfix.submission_port if s.kind == "outbound"
                else self.lab.postfix.smtp_port)
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            smtp.ehlo("client.example.org")
            if s.tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=ctx)
                smtp.ehlo("client.example.org")
            for i in s.ids:
                sender, rcpt, raw = self.message(s.kind, i)
                code, text = smtp.mail(sender)
                stage = "mail"
                if code == 250:
                    code, text = smtp.rcpt(rcpt)
                    stage = "rcpt"
                if code == 250:
                    code, text = smtp.data(raw)
                    stage = "data"
                else:
                    smtp.rset()
                with self._lock:
                    self.replies[i] = (stage, code, text.decode())

    def worker(self, work: queue.Queue[Session]) -> None:
        while True:
            try:
                s = work.get_nowait()
            except queue.Empty:
                return
            try:
                self.run_session(s)
            except Exception as exc:  # counted: an unfinished session fails the accounting
                with self._lock:
                    self.errors.append(f"{s}: {exc!r}")


@pytest.fixture(scope="module")
def soak_lab() -> Iterator[tuple[Lab, keys.SigningKey]]:
    need(os.geteuid() == 0, "the soak starts a private Postfix and needs root")
    missing = missing_tools()
    need(not missing, f"Debian packages missing: apt-get install {' '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="mailward-soak-"))
    try:
        key = keys.generate(domain="example.org", selector="soak", kind="ed25519",
                            directory=str(root))
        config = merge_ini(BASE_CONFIG, f"[check.dkim_sign]\nkeys = example.org soak {key.path}\n")
        with running_lab(config, root=root, zone=ZONE + keys.zone_line(key) + "\n",
                         main_extra={"default_process_limit": "150"}) as lab:
            yield lab, key
    finally:
        shutil.rmtree(root, ignore_errors=True)


def held_ids(lab: Lab) -> list[int]:
    return [int(m.group(1)) for q in lab.postfix.held()
            for r in q.get("recipients", [])  # type: ignore[attr-defined]
            if (m := re.fullmatch(r"r(\d+)@example\.net", str(r.get("address", ""))))]


def examine_sink(lab: Lab, key: keys.SigningKey,
                 kind_of: dict[int, str]) -> tuple[collections.Counter[int], list[str]]:
    """How often each message arrived, and what is wrong with the copies that did."""
    record = keys.dns_record(key).encode()

    def published(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"soak._domainkey.example.org."
        return record

    delivered: collections.Counter[int] = collections.Counter()
    wrong: list[str] = []
    for m in lab.sink.messages:
        found = re.search(rb"^Message-ID: <soak-(\d+)@example\.org>", m.data, re.M | re.I)
        if found is None:
            wrong.append(f"unknown message at the sink: {m.data[:200]!r}")
            continue
        i = int(found.group(1))
        delivered[i] += 1
        ar = " ".join(v for n, v in m.headers() if n.lower() == "authentication-results")
        if not ar.strip().startswith("mx.lab.test;"):
            wrong.append(f"{i} ({kind_of[i]}) without our Authentication-Results")
        elif kind_of[i] == "pass" and not all(
                r in ar for r in ("spf=pass", "dkim=pass header.d=example.org",
                                  "dmarc=pass header.from=example.org")):
            wrong.append(f"{i} (pass) with {ar!r}")
        elif kind_of[i] == "outbound" and not dkimpy.verify(m.data, dnsfunc=published):
            wrong.append(f"{i} (outbound) without a valid signature of ours")
    return delivered, wrong


def as_prescribed(kind: str, reply: tuple[str, int, str], delivered: int, held: int) -> bool:
    if kind in ("pass", "outbound"):
        return reply[:2] == ("data", 250) and delivered == 1 and held == 0
    if kind == "quarantine":
        return reply[:2] == ("data", 250) and held == 1 and delivered == 0
    if kind == "spoof":
        return reply == ("data", 550, SPOOF_TEXT) and delivered + held == 0
    return reply == ("rcpt", 530, TLS_TEXT) and delivered + held == 0


def test_soak_accounts_for_every_message(soak_lab: tuple[Lab, keys.SigningKey]) -> None:
    lab, key = soak_lab
    soak = Soak(lab, key)
    sessions = plan(COUNT)
    kind_of = {i: s.kind for s in sessions for i in s.ids}
    assert sorted(kind_of) == list(range(COUNT))
    work: queue.Queue[Session] = queue.Queue()
    for s in sessions:
        work.put(s)
    start = time.monotonic()
    threads = [threading.Thread(target=soak.worker, args=(work,)) for _ in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent_in = time.monotonic() - start
    assert not soak.errors, soak.errors[:5]
    assert sorted(soak.replies) == list(range(COUNT))

    expected = collections.Counter(kind_of.values())
    to_deliver = expected["pass"] + expected["outbound"]
    deadline = time.monotonic() + 120 + COUNT / 20
    while len(lab.sink.messages) < to_deliver and time.monotonic() < deadline:
        time.sleep(0.2)
    while len(held_ids(lab)) < expected["quarantine"] and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # anything extra (a duplicate) that was still on its way arrives now

    delivered, wrong = examine_sink(lab, key, kind_of)
    held = collections.Counter(held_ids(lab))
    outcome: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for i in range(COUNT):
        kind, reply = kind_of[i], soak.replies[i]
        ok = as_prescribed(kind, reply, delivered[i], held[i])
        outcome[kind]["ok" if ok else "wrong"] += 1
        if not ok:
            wrong.append(f"{i} ({kind}): reply {reply}, delivered {delivered[i]}, held {held[i]}")
    total_ok = sum(c["ok"] for c in outcome.values())
    print(f"\nsoak: {COUNT} messages at {SESSIONS} sessions sent in {sent_in:.1f} s "
          f"({COUNT / sent_in:.0f} msg/s); delivered {sum(delivered.values())}, "
          f"held {sum(held.values())}, refused 550 {outcome['spoof']['ok']}, "
          f"refused 530 {outcome['plaintext']['ok']}; accounted {total_ok}/{COUNT}")
    assert not wrong, f"{len(wrong)} wrong, first: " + "; ".join(wrong[:5])
    assert total_ok == COUNT
    assert sum(delivered.values()) == to_deliver and sum(held.values()) == expected["quarantine"]
    log = lab.mailward.log()
    bad = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, bad[:5]
