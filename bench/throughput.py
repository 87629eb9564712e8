"""Throughput through a real private Postfix, with and without mailward, in one run.

Run by hand as root (Debian, postfix installed):
    .venv/bin/python bench/throughput.py [-n 400] [-c 4] [--per-connection 1] [--socket inet]

Prints messages per second from the first SMTP connection until the last message reached the
next hop, for a no-milter baseline and with mailward attached, their ratio, and mailward's CPU
time and peak memory. Each message has 20 header fields, a Bcc and a forged A-R to remove, and
a 4 KB body; every other SMTP session uses STARTTLS. SPF, DKIM (no signature) and DMARC run
against the lab's DNS server (example.org: SPF pass, DMARC p=reject); the figure "DNS
queries/msg sent" counts lookups that reached that server after the warm-up.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "milter"))

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import LAB_CONFIG, CaptureSink, MailwardProcess, PostfixLab, merge_ini

CONFIG = merge_ini(LAB_CONFIG, "[check.tls]\nrequire_domains = secure.example\n")


def message(i: int) -> bytes:
    filler = "".join(f"X-Filler-{k}: value {k} of message {i}\r\n" for k in range(14))
    header = (f"From: bench@example.org\r\nTo: rcpt{i}@example.net\r\nSubject: bench {i}\r\n"
              f"Message-ID: <bench-{i}@example.org>\r\nBcc: hidden@example.org\r\n"
              f"Authentication-Results: mx.lab.test; spf=pass\r\n{filler}\r\n")
    return (header + ("y" * 78 + "\r\n") * 52).encode()  # 52 lines of 80 bytes: ~4 KB


def send_batch(port: int, ids: list[int], per_connection: int) -> None:
    """Send `ids`, `per_connection` messages per SMTP session; every other session uses TLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k in range(0, len(ids), per_connection):
        chunk = ids[k:k + per_connection]
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            if chunk[0] % 2:
                s.starttls(context=ctx)
            for i in chunk:
                s.sendmail("bench@example.org", [f"rcpt{i}@example.net"], message(i))


def run(lab: PostfixLab, sink: CaptureSink, n: int, concurrency: int,
        per_connection: int) -> float:
    start = time.perf_counter()
    batches = [list(range(k, n, concurrency)) for k in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: send_batch(lab.smtp_port, b, per_connection), batches))
    deadline = time.monotonic() + 300
    while len(sink.messages) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(sink.messages)} of {n} arrived")
        time.sleep(0.01)
    return time.perf_counter() - start


def proc_stats(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return cpu, hwm


def start_mailward(mw: MailwardProcess, sock: Path | None) -> None:
    if sock is None:
        mw.start()
        return
    mw.write()
    sock.parent.chmod(0o755)  # Postfix (user postfix) must reach it
    with open(mw.log_path, "ab") as log:
        mw.proc = subprocess.Popen([sys.executable, "-m", "mailward", "run", "-c",
                                    str(mw.config_path())], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(mw.log())
        time.sleep(0.05)
    sock.chmod(0o666)  # the bench's private socket, for Postfix's cleanup


def dns_queries(port: int) -> tuple[float, float]:
    """(queries that reached the DNS server, answers from cache) from mailward's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    sent = cached = 0.0
    for m in re.finditer(r'^mailward_dns_queries_total\{.*outcome="(\w+)".*\} (\S+)$', text,
                         re.M):
        if m.group(1) == "cached":
            cached += float(m.group(2))
        else:
            sent += float(m.group(2))
    return sent, cached


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=400, help="messages per run")
    ap.add_argument("-c", type=int, default=4, help="concurrent SMTP clients")
    ap.add_argument("--per-connection", type=int, default=1,
                    help="messages per SMTP session (MX traffic is mostly 1)")
    ap.add_argument("--socket", choices=("inet", "unix"), default="inet",
                    help="how Postfix reaches mailward")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailward-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 - Postfix (user postfix) must reach it
    results = {}
    try:
        for name in ("baseline", "mailward"):
            sink = CaptureSink()
            ns = Nameserver()
            ns.load_zone('example.org. TXT "v=spf1 ip4:127.0.0.1 -all"\n'
                         '_dmarc.example.org. TXT "v=DMARC1; p=reject"\n')
            mw = MailwardProcess(CONFIG, root / name / "mailward", dns_port=ns.port)
            if args.socket == "unix":
                sock = root / name / "mailward" / "milter.sock"
                mw.config_text = CONFIG.replace("inet:{port}@127.0.0.1", f"unix:{sock}")
                mw.port = 0
            extra = {"smtpd_milters": "", "non_smtpd_milters": ""} if name == "baseline" else {}
            milter = f"unix:{sock}" if args.socket == "unix" else mw.postfix_socket
            lab = PostfixLab(root / name / "postfix", milter, sink.port, extra)
            if name == "mailward":
                start_mailward(mw, sock if args.socket == "unix" else None)
            lab.start()
            try:
                run(lab, sink, min(20, args.n), args.c, args.per_connection)  # warm up
                sink.messages.clear()
                before = dns_queries(mw.metrics_port) if mw.proc else (0.0, 0.0)
                seconds = run(lab, sink, args.n, args.c, args.per_connection)
                after = dns_queries(mw.metrics_port) if mw.proc else (0.0, 0.0)
                results[name] = args.n / seconds
                line = (f"{name:9} {args.n} messages in {seconds:6.2f} s = "
                        f"{results[name]:7.1f} msg/s")
                if mw.proc is not None:
                    cpu, hwm = proc_stats(mw.proc.pid)
                    line += (f"; mailward CPU {cpu:.2f} s ({1000 * cpu / args.n:.2f} ms/msg),"
                             f" peak RSS {hwm / 1024:.1f} MiB; DNS queries/msg "
                             f"{(after[0] - before[0]) / args.n:.2f} sent, "
                             f"{(after[1] - before[1]) / args.n:.2f} from cache")
                print(line, flush=True)
            finally:
                lab.stop()
                mw.stop()
                sink.close()
                ns.close()
        print(f"ratio mailward/baseline: {results['mailward'] / results['baseline']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
