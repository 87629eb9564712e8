"""`mailward demo`: a private Postfix with mailward attached, seven sample messages, a summary.

Needs root and Debian's `postfix` (the README's `make demo` installs it). Everything runs on
127.0.0.1 under a temporary directory and is removed afterwards (unless `--keep`).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mailward.lab.postfix import (
    LAB_CONFIG,
    Captured,
    CaptureSink,
    PostfixLab,
    merge_ini,
    missing_tools,
    running_lab,
)
from mailward.services import keys

CONFIG = merge_ini(LAB_CONFIG, """
[milter]
local_domains = lab.test

[check.tls]
# secure.example wants TLS 1.3: no TLS is refused, older TLS is held for review.
require_domains = secure.example
min_version = TLSv1.3
version_action = quarantine

[check.trace]
internal_hosts = corp.lab.test
strip_headers = X-Originating-IP, X-Mailer
""")


# The demo's own DNS: example.org lets the lab's 127.0.0.1 send for it (SPF pass, aligned:
# DMARC pass); bank.example publishes DMARC p=reject and lets nobody send.
ZONE = """
example.org.         TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.example.org.  TXT "v=DMARC1; p=reject"
bank.example.        TXT "v=spf1 -all"
_dmarc.bank.example. TXT "v=DMARC1; p=reject"
"""


@dataclass(frozen=True)
class Sample:
    title: str
    rcpt: str
    headers: str
    tls: str = "TLSv1.3"  # "" for plain text
    submission: bool = False
    author: str = "demo@example.org"


SAMPLES = (
    Sample("clean, over STARTTLS", "alice@example.net",
           "Subject: hello\r\n"),
    Sample("no TLS, to a domain that requires it", "bob@secure.example",
           "Subject: plain text\r\n", tls=""),
    Sample("with a Bcc header", "carol@example.net",
           "Subject: blind copy\r\nBcc: secret-boss@example.org\r\n"),
    Sample("TLS 1.2 to a domain that requires TLS 1.3", "dave@secure.example",
           "Subject: old TLS\r\n", tls="TLSv1.2"),
    Sample("forged Authentication-Results", "erin@example.net",
           "Subject: trust me\r\n"
           "Authentication-Results: MX.LAB.TEST; spf=pass smtp.mailfrom=ceo@example.com\r\n"
           "Authentication-Results: other.example; dkim=pass header.d=example.org\r\n"),
    Sample("submitted after an internal relay (signed on the way out)", "frank@example.net",
           "Subject: leaving the building\r\n"
           "Received: from laptop.corp.lab.test (laptop.corp.lab.test [10.1.2.3])\r\n"
           "\tby relay.corp.lab.test with ESMTP id 42; Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           "X-Originating-IP: [10.1.2.3]\r\nX-Mailer: Internal Mailer 1.0\r\n",
           submission=True),
    Sample("From a domain with DMARC p=reject, not aligned", "grace@example.net",
           "Subject: urgent wire transfer\r\n", author="ceo@bank.example"),
)


def send(lab: PostfixLab, sample: Sample, n: int) -> str:
    port = lab.submission_port if sample.submission else lab.smtp_port
    msg = (f"From: {sample.author}\r\nTo: {sample.rcpt}\r\nMessage-ID: <demo-{n}@example.org>\r\n"
           f"{sample.headers}\r\nThis is sample {n}.\r\n").encode()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            if sample.tls:
                ctx = ssl._create_unverified_context()  # noqa: S323 - the lab's own cert
                ctx.maximum_version = ssl.TLSVersion[sample.tls.replace(".", "_")]
                s.starttls(context=ctx)
            s.sendmail("demo@example.org", [sample.rcpt], msg)
            return "250 accepted"
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = exc.recipients[sample.rcpt]
        return f"{code} {text.decode() if isinstance(text, bytes) else text}"
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return f"{exc.smtp_code} {error.decode() if isinstance(error, bytes) else error}"


def outcome(lab: PostfixLab, sink: CaptureSink, n: int, held_before: int) -> Captured | None:
    """The message as it arrived at the next hop, or None once it sits in the hold queue."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return sink.wait_for(lambda m: f"<demo-{n}@example.org>".encode() in m.data, 0.2)
        except TimeoutError:
            if len(lab.held()) > held_before:
                return None
    raise TimeoutError(f"sample {n} neither arrived nor was held")


def main(*, keep: bool = False) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("mailward demo: run as root (it starts a private Postfix)\n")
        return 1
    missing = missing_tools()
    if missing:
        sys.stderr.write(f"mailward demo: missing Debian packages; run: apt-get install "
                         f"{' '.join(missing)}\n")
        return 1
    root = Path(tempfile.mkdtemp(prefix="mailward-demo-"))
    print(f"Starting a private Postfix on 127.0.0.1 with mailward attached (in {root}) ...")
    keydir = root / "keys"
    keydir.mkdir()
    signing = [keys.generate(domain="example.org", selector="demo-rsa", directory=str(keydir)),
               keys.generate(domain="example.org", selector="demo-ed", kind="ed25519",
                             directory=str(keydir))]
    config = merge_ini(CONFIG, "[check.dkim_sign]\nkeys = " + "\n    ".join(
        str(k) for k in signing) + "\n")
    zone = ZONE + "".join(keys.zone_line(k) + "\n" for k in signing)
    with running_lab(config, root=root, zone=zone) as running:
        lab, mw, sink = running.postfix, running.mailward, running.sink
        print(f"  Postfix smtpd 127.0.0.1:{lab.smtp_port}, submission "
              f"127.0.0.1:{lab.submission_port} (ORIGINATING), mailward {mw.postfix_socket}, "
              f"metrics http://127.0.0.1:{mw.metrics_port}/metrics\n")
        for n, sample in enumerate(SAMPLES, 1):
            held_before = len(lab.held())
            reply = send(lab, sample, n)
            print(f"{n}. {sample.title}: {sample.author}  ->  {sample.rcpt}"
                  f"{' via submission' if sample.submission else ''}"
                  f" ({sample.tls or 'no TLS'})")
            print(f"   SMTP reply: {reply}")
            if not reply.startswith("250"):
                print()
                continue
            got = outcome(lab, sink, n, held_before)
            if got is None:
                print("   held in Postfix's hold queue (quarantine), not delivered")
            else:
                print("   arrived at the next hop with these headers:")
                for name, value in got.headers():
                    print(f"     {name}:{value}".replace("\n", "\n     "))
            print()
        held = lab.held()
        print(f"Hold queue: {len(held)} message(s) "
              + ", ".join(str(q.get("queue_id")) for q in held))
        print("\nmailward's log:")
        for line in mw.log().splitlines():
            if "qid=" in line:
                print("  " + line.split(": ", 1)[-1])
        if keep:
            print(f"\n--keep: the lab stays up until you press Enter (files in {root}).")
            input()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0
