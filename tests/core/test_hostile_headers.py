"""No header field up to Postfix's 100 KB limit costs more than it should anywhere in the chain.

Every field the checks read, filled with shapes that made a parser super-linear before (nested
comments, quotes, hex runs, white space, `@` runs, base64 with a bad end), goes through the full
inbound and outbound chains (`pipeline.evaluate`, DNS on loopback). The suite asserts that 10x
the field costs at most a small multiple (a quadratic parser gives ~100x); with
`MAILWARD_FUZZ=1` (`make fuzz`) it also asserts the absolute bound: 50 ms per message.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import pytest

from mailward.core import pipeline
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import Body, Stage
from mailward.lab.dns import Nameserver
from mailward.services import keys
from tests.conftest import make_config, make_tx, snapshot_of

FUZZ = os.environ.get("MAILWARD_FUZZ", "") not in ("", "0")
POSTFIX_HEADER_LIMIT = 102400  # header_size_limit

SHAPES: dict[str, Callable[[int], str]] = {
    "nested comments": lambda n: "(" * (n // 2) + ")" * (n // 2),
    "quotes": lambda n: '"' + "\\x" * (n // 2) + '"',
    "hex run": lambda n: "a" * n + "!",
    "spaces": lambda n: "x" + " " * n + "!",
    "at signs": lambda n: "a@" * (n // 2),
    "dotted": lambda n: "1." * (n // 2),
    "colons": lambda n: "fd00::" * (n // 6),
    "base64 bad end": lambda n: "v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=AAAA; b=A"
                                + " " * (n - 60) + "!",
    "folds": lambda n: "x\n\t" * (n // 3),
    "addresses": lambda n: "a@b.example, " * (n // 13),
    "our results": lambda n: "mx.example.com; " + "spf=pass smtp.mailfrom=a@b.c (x); " * (n // 35),
}
FIELDS = ("From", "DKIM-Signature", "Authentication-Results", "Received", "Subject",
          "Bcc", "X-Originating-IP", "To", "Message-ID", "ARC-Seal", "ARC-Message-Signature",
          "ARC-Authentication-Results")


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Snapshot]:
    server = Nameserver()
    server.load_zone('x.example. TXT "v=spf1 -all"\n_dmarc.x.example. TXT "v=DMARC1; p=reject"\n'
                     's._domainkey.x.example. TXT "v=DKIM1; p=MFwwDQYJKoZIhvcNAQEBBQADSwAw"\n')
    seal = keys.generate(domain="x.example", selector="arc", directory=str(
        tmp_path_factory.mktemp("arckey")))
    base = (f"[dns]\nnameservers = 127.0.0.1:{server.port}\ntimeout = 0.5\nlifetime = 0.5\n"
            "budget = 1\n[policy]\nchecks = tls, sender, ratelimit, spf, dkim, arc, dmarc, bcc, "
            "trace, dkim_sign, authres, arc_seal\n[check.trace]\ninternal_hosts = corp.example\n"
            f"[check.arc_seal]\nkey = x.example arc {seal.path}\nnetworks = 203.0.113.0/24\n")
    return {"inbound": snapshot_of(make_config(base)),
            "outbound": snapshot_of(make_config(base))}


def run(snapshot: Snapshot, direction: str, name: str, value: str) -> float:
    headers = [("From", " a@x.example"), ("To", " b@y.example"), (name, " " + value)]
    body = Body(threshold=1 << 20)
    body.write(b"hello\r\n")
    extra = {"auth_user": "alice@x.example"} if direction == "outbound" else {}
    tx = make_tx(headers=headers, body=body, mail_from="a@x.example", helo="h.x.example",
                 recipients=("b@y.example",), **extra)  # type: ignore[arg-type]
    gc.disable()
    try:
        start = time.thread_time()  # CPU time: other processes do not count
        pipeline.evaluate(Stage.EOM, tx, snapshot)
        return time.thread_time() - start
    finally:
        gc.enable()
        body.close()


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_hostile_field_costs_linear_time(chains: dict[str, Snapshot], direction: str,
                                           field: str, shape: str) -> None:
    snapshot = chains[direction]
    make = SHAPES[shape]
    run(snapshot, direction, field, make(1000))  # warm caches (DNS, regexes)
    small = min(run(snapshot, direction, field, make(10_000)) for _ in range(3))
    large = min(run(snapshot, direction, field, make(POSTFIX_HEADER_LIMIT - 100))
                for _ in range(2))
    assert large < 25 * max(small, 0.002), (small, large)
    if FUZZ:
        assert large < 0.050, f"{field} with {shape}: {large * 1000:.1f} ms"
