"""The policy core alone: the full default chain on one typical inbound message, in-process.

Run by hand:  .venv/bin/python bench/core.py [-n 2000] [--signed] [--senders] [--profile]

With --signed the message carries a DKIM-Signature (rsa-sha256 2048, relaxed/relaxed) of its
aligned domain, published on the loopback DNS server: the DKIM check verifies it. With
--senders each message has an envelope sender of its own (n1@example.org, n2@…), so SPF is
evaluated for every message instead of given again by the resolver's memo (services/dns.py).

No MTA, no milter protocol: a loopback DNS server answers (warm cache after the first
message), counters are in memory. Compare with bench/throughput.py's CPU per message to see
what the milter protocol handling costs on top.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import ipaddress
import itertools
import pstats
import sys
import tempfile
import time
from pathlib import Path

import dkim as dkimpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "milter"))

from mailward.checks import REGISTRY
from mailward.core import config, pipeline
from mailward.core.snapshot import build
from mailward.core.transaction import Body, Stage, Tls, Transaction, index_headers
from mailward.lab.dns import Nameserver
from mailward.scan import parse_message
from mailward.services import keys

MESSAGE = (b"From: bench@example.org\r\nTo: x@example.net\r\nSubject: s\r\nMessage-ID: <1@x>\r\n"
           + b"".join(b"X-Filler-%d: value\r\n" % i for i in range(14)) + b"\r\n"
           + (b"y" * 78 + b"\r\n") * 52)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--signed", action="store_true", help="a DKIM-signed message")
    ap.add_argument("--senders", action="store_true", help="an envelope sender per message")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="cumulative", help="profile order (cProfile key)")
    ap.add_argument("--top", type=int, default=25, help="profile lines")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    ns = Nameserver()
    ns.load_zone('example.org. TXT "v=spf1 ip4:127.0.0.1 -all"\n'
                 '_dmarc.example.org. TXT "v=DMARC1; p=reject"\n')
    message = MESSAGE
    if args.signed:
        with tempfile.TemporaryDirectory() as d:
            key = keys.generate(domain="example.org", selector="bench", directory=d)
        ns.load_zone(keys.zone_line(key))
        message = dkimpy.sign(MESSAGE, b"bench", b"example.org", key.material,
                              canonicalize=(b"relaxed", b"relaxed")) + MESSAGE
    cfg = config.loads("[milter]\nauthserv_id = mx.lab.test\ntrusted_networks = 192.0.2.0/24\n"
                       f"[dns]\nnameservers = 127.0.0.1:{ns.port}\n", REGISTRY)
    snapshot = build(cfg)
    pairs, body = parse_message(message)
    base = Transaction(stage=Stage.CONNECT, client_ip=ipaddress.ip_address("127.0.0.1"),
                       helo="client.example.org", tls=Tls("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
                       mail_from="bench@example.org")

    per_check: dict[str, float] = collections.defaultdict(float)

    def observe(name: str, _result: object, seconds: float) -> None:
        per_check[name] += seconds

    count = itertools.count()

    def one() -> None:
        tx = base
        if args.senders:
            tx = dataclasses.replace(base, mail_from=f"n{next(count)}@example.org")
        tx, _ = pipeline.evaluate(Stage.MAIL, tx, snapshot, observe=observe)
        tx = dataclasses.replace(tx, recipients=("x@example.net",))
        pipeline.evaluate(Stage.RCPT, tx, snapshot, observe=observe)
        spool = Body(threshold=1 << 20)
        spool.write(body.replace(b"\n", b"\r\n"))
        tx = dataclasses.replace(tx, headers=index_headers(pairs), body=spool)
        pipeline.evaluate(Stage.EOM, tx, snapshot, observe=observe)
        spool.close()

    one()  # warm the DNS cache
    per_check.clear()
    warm = len(ns.queries)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.n):
        one()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    print(f"{args.n} messages through {len(cfg.chain)} checks: "
          f"{1000 * seconds / args.n:.3f} ms/message, {args.n / seconds:.0f} messages/s "
          f"on one core, CPU {1000 * cpu / args.n:.3f} ms/message; "
          f"DNS queries after warm-up: {len(ns.queries) - warm}")
    print("wall time per message by check, all stages (ms): " + ", ".join(
        f"{name} {1000 * t / args.n:.3f}" for name, t in per_check.items()))
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(300):
            one()
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    ns.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
