"""Peak memory of the milter with many large DKIM messages in flight at once, through Postfix.

Run by hand as root (Debian, postfix installed):
    .venv/bin/python bench/memory.py [-c 100] [--mb 20]

Two phases against one mailward process, each with `-c` SMTP sessions sending at once, one
`--mb` MB message each, so that every session's body is in the milter at the same time:
  inbound   DKIM-signed (rsa-sha256, simple/simple) aligned mail from example.org: mailward
            verifies the signature (body hash from its spool);
  outbound  the same body, unsigned, on the submission port: mailward signs it (relaxed/relaxed).
Prints the milter's peak RSS (VmHWM, reset between phases) and time per phase, and checks that
every message arrived whole at the next hop with the expected result (dkim=pass in our
Authentication-Results inbound, our DKIM-Signature outbound). Issue 7's target: < 300 MB at
100 sessions of 20 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

import dkim as dkimpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "milter"))

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import LAB_CONFIG, CaptureSink, MailwardProcess, PostfixLab, merge_ini
from mailward.services import keys

LINE = b"TWFpbHdhcmQgbWVtb3J5IGJlbmNobWFyazogYSBsYXJnZSBhdHRhY2htZW50IGxpbmUgb2YgYmFzZTY0Cg==\r\n"


def body(megabytes: int) -> bytes:
    return LINE * (megabytes * 1024 * 1024 // len(LINE))


def send(port: int, head: bytes, payload: bytes, seq: int, errors: list[str]) -> None:
    """One SMTP session streaming one message (no line starts with a dot: no stuffing)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=600) as s:
            s.ehlo("bench.example.org")
            s.mail("bench@example.org")
            s.rcpt(f"rcpt{seq}@example.net")
            code, _ = s.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, b"DATA refused")
            sock = s.sock
            if sock is None:
                raise smtplib.SMTPServerDisconnected("no socket")
            sock.sendall(f"X-Bench-Seq: {seq}\r\n".encode() + head)
            view = memoryview(payload)
            for k in range(0, len(view), 1 << 20):
                sock.sendall(view[k:k + (1 << 20)])
            sock.sendall(b".\r\n")
            code, reply = s.getreply()
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
    except Exception as exc:  # reported with the phase's figures
        errors.append(f"session {seq}: {exc!r}")


def hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def phase(name: str, port: int, head: bytes, payload: bytes, *, sessions: int,
          sink: CaptureSink, pid: int, expect: bytes) -> bool:
    sink.messages.clear()
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = hwm_kib(pid)
    errors: list[str] = []
    threads = [threading.Thread(target=send, args=(port, head, payload, i, errors))
               for i in range(sessions)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 600
    while len(sink.messages) < sessions - len(errors) and time.monotonic() < deadline:
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    peak = hwm_kib(pid)
    whole = [m for m in sink.messages if m.size >= len(payload) and expect in m.data]
    print(f"{name:8} {sessions} x {len(payload) / 2**20:.0f} MB in {seconds:6.1f} s: "
          f"milter peak RSS {peak / 1024:6.1f} MiB (at start {base / 1024:.1f} MiB); "
          f"{len(whole)}/{sessions} arrived whole with {expect.decode()!r}; "
          f"{len(errors)} refused", flush=True)
    for e in errors[:5]:
        print("   ", e)
    return len(whole) == sessions and not errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", type=int, default=100, help="concurrent sessions (one message each)")
    ap.add_argument("--mb", type=int, default=20, help="message size in MB")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailward-memory-"))
    os.chmod(root, 0o755)  # noqa: S103 - Postfix (user postfix) must reach it
    sink = CaptureSink(keep_body=False)
    ns = Nameserver()
    try:
        key = keys.generate(domain="example.org", selector="bench", directory=str(root))
        ns.load_zone('example.org. TXT "v=spf1 ip4:127.0.0.1 -all"\n'
                     '_dmarc.example.org. TXT "v=DMARC1; p=reject"\n' + keys.zone_line(key))
        config = merge_ini(LAB_CONFIG, f"[check.dkim_sign]\nkeys = example.org bench {key.path}\n")
        mw = MailwardProcess(config, root / "mailward", port=0, dns_port=ns.port)
        lab = PostfixLab(root / "postfix", mw.postfix_socket, sink.port,
                         {"default_process_limit": str(max(100, args.c + 10))})
        payload = body(args.mb)
        head = (b"From: bench@example.org\r\nTo: rcpt@example.net\r\n"
                b"Subject: large attachment\r\nMessage-ID: <memory-bench@example.org>\r\n\r\n")
        sig = dkimpy.sign(head + payload, b"bench", b"example.org", key.material,
                          canonicalize=(b"simple", b"simple"),
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
        mw.start()
        lab.start()
        try:
            assert mw.proc is not None
            run = {"sessions": args.c, "sink": sink, "pid": mw.proc.pid}
            ok = phase("inbound", lab.smtp_port, sig + head, payload, **run,
                       expect=b"dkim=pass")
            ok &= phase("outbound", lab.submission_port, head, payload, **run,
                        expect=b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        finally:
            lab.stop()
            mw.stop()
    finally:
        sink.close()
        ns.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
