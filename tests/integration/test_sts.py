"""MTA-STS through the real Postfix (issue 12, item 3).

In a network namespace of its own: the lab DNS on 127.0.0.1:53 (the namespace's resolv.conf),
an HTTPS policy host on 127.0.0.10:443 with a certificate from a test CA, MX hosts on :25 of
127.0.0.11-16 (some offering STARTTLS with a certificate for their name), `mailward sts run`
on a unix socket, and a Postfix that looks up MX records itself and asks the service for each
domain's TLS policy. What Postfix does with each domain's mail is read from its log and from
what the MX hosts received.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailward.lab.postfix import missing_tools
from mailward.lab.stsnet import Netns, OutboundPostfix, available
from mailward.lab.tlslab import TestCA
from mailward.sts import netstring
from tests.conftest import need


def policy(mode: str, *mx: str) -> str:
    return "version: STSv1\nmode: " + mode + "\n" + "".join(f"mx: {m}\n" for m in mx) + \
        "max_age: 86400\n"


# domain: (policy, MX host, its address, STARTTLS certificate name or None)
DOMAINS = {
    "good.test": (policy("enforce", "mx.good.test"), "mx.good.test", "127.0.0.11",
                  "mx.good.test"),
    "notls.test": (policy("enforce", "mx.notls.test"), "mx.notls.test", "127.0.0.12", None),
    "nomatch.test": (policy("enforce", "mx.nomatch.test"), "mx.other.test", "127.0.0.13",
                     "mx.other.test"),
    "testing.test": (policy("testing", "mx.testing.test"), "mx.testing.test", "127.0.0.14",
                     None),
    "wild.test": (policy("enforce", "*.wild.test"), "mx1.wild.test", "127.0.0.15",
                  "mx1.wild.test"),
    "cached.test": (policy("enforce", "mx.cached.test"), "mx.cached.test", "127.0.0.16", None),
}


@dataclass
class StsNet:
    netns: Netns
    postfix: OutboundPostfix
    capture: Path
    servers: subprocess.Popen[str]
    socket_path: Path
    service_log: Path

    def command(self, line: str) -> None:
        assert self.servers.stdin is not None and self.servers.stdout is not None
        self.servers.stdin.write(line + "\n")
        self.servers.stdin.flush()
        assert self.servers.stdout.readline().strip() == f"ok {line}"

    def send(self, domain: str) -> str:
        message_id = f"<{domain}.{time.monotonic_ns()}@out.lab.test>"
        self.postfix.submit("sender@out.lab.test", f"user@{domain}", (
            f"From: sender@out.lab.test\r\nTo: user@{domain}\r\nSubject: sts\r\n"
            f"Message-ID: {message_id}\r\n\r\nhello\r\n").encode())
        return message_id

    def outcome(self, message_id: str, timeout: float = 60) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.postfix.statuses().get(message_id)
            if found:
                return found[-1]
            time.sleep(0.2)
        raise AssertionError(f"no delivery attempt for {message_id} in the log:\n"
                             + self.postfix.log_text()[-3000:])

    def received(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in sorted(self.capture.glob("*.json"))]

    def ask(self, domain: str) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.socket_path))
            sock.sendall(netstring.encode(f"postfix {domain}".encode()))
            buffer = b""
            while (got := netstring.decode(buffer, 100000)) is None:
                chunk = sock.recv(4096)
                assert chunk
                buffer += chunk
            return got[0]


@pytest.fixture(scope="module")
def stsnet() -> Iterator[StsNet]:
    need(os.geteuid() == 0, "network namespaces and Postfix need root")
    missing = missing_tools()
    need(not missing, f"missing: {', '.join(missing)}")
    why = available()
    need(not why, why)
    # not under pytest's 0700 temporary directory: Postfix's user must reach its data
    # directory and the CA file
    root = Path(tempfile.mkdtemp(prefix="mailward-sts-"))
    os.chmod(root, 0o755)  # noqa: S103
    ca = TestCA(root / "ca")
    os.chmod(root / "ca", 0o755)  # noqa: S103
    zone = []
    mx_specs = []
    for domain, (_, mx, ip, cert_name) in DOMAINS.items():
        zone += [f"_mta-sts.{domain}. TXT \"v=STSv1; id=1;\"", f"mta-sts.{domain}. A 127.0.0.10",
                 f"{domain}. MX 10 {mx}.", f"{mx}. A {ip}"]
        spec: dict[str, str] = {"ip": ip, "hostname": mx}
        if cert_name:
            cert, key = ca.issue(cert_name, [cert_name])
            spec |= {"cert": str(cert), "key": str(key)}
        mx_specs.append(spec)
    # fresh.test publishes a policy id, but is first asked for once its host is down
    zone += ['_mta-sts.fresh.test. TXT "v=STSv1; id=1;"', "mta-sts.fresh.test. A 127.0.0.10"]
    cert, key = ca.issue("policies", [f"mta-sts.{d}" for d in DOMAINS])
    capture = root / "capture"
    capture.mkdir()
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps({
        "zone": "\n".join(zone) + "\n", "capture_dir": str(capture), "mx": mx_specs,
        "https": [{"ip": "127.0.0.10", "cert": str(cert), "key": str(key),
                   "policies": {d: v[0] for d, v in DOMAINS.items()}}]}))
    netns = Netns()
    servers = service = None
    postfix = None
    try:
        servers = subprocess.Popen(netns.command(sys.executable, "-m", "mailward.lab.stsnet",
                                                 str(spec_file)),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert servers.stdout is not None and servers.stdout.readline().strip() == "ready"
        socket_path = root / "sts.sock"
        ini = root / "mailward.ini"
        ini.write_text(f"[dns]\nnameservers = 127.0.0.1:53\ntimeout = 1\nlifetime = 2\n"
                       f"[sts]\nlisten = unix:{socket_path}\ncache_path = {root / 'sts.sqlite'}\n"
                       f"ca_file = {ca.ca_file}\nfetch_timeout = 5\n"
                       "allow_private_addresses = yes\n")  # the lab's hosts: 127.0.0.x
        service_log = root / "sts.log"
        with service_log.open("w") as log:
            service = subprocess.Popen(netns.command(sys.executable, "-m", "mailward", "sts",
                                                     "run", "-c", str(ini)),
                                       stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert service.poll() is None, service_log.read_text()
            assert time.monotonic() < deadline, "mailward sts did not start"
            time.sleep(0.1)
        shutil.chown(socket_path, group="postfix")  # mode 0660: Postfix's smtp may connect
        postfix = OutboundPostfix(root / "postfix", netns,
                                  f"socketmap:unix:{socket_path}:postfix", str(ca.ca_file))
        postfix.start()
        yield StsNet(netns, postfix, capture, servers, socket_path, service_log)
    finally:
        if postfix is not None:
            postfix.stop()
        for proc in (service, servers):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
        if servers is not None:
            for stream in (servers.stdin, servers.stdout):
                if stream is not None:
                    stream.close()
        netns.close()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_delivers_as_each_domains_policy_says(stsnet: StsNet) -> None:
    # cached while the policy host is up ...
    cached = stsnet.ask("cached.test")
    assert cached == b"OK secure match=mx.cached.test servername=hostname"
    ids = {d: stsnet.send(d) for d in DOMAINS if d != "cached.test"}
    outcomes = {d: stsnet.outcome(i) for d, i in ids.items()}
    received = {m["mx"]: m for m in stsnet.received()}
    log = stsnet.postfix.log_text()

    # enforce, and the MX has a valid certificate for a name the policy lists: over TLS
    assert outcomes["good.test"][0] == "sent", outcomes["good.test"]
    assert received["mx.good.test"]["tls"] in ("TLSv1.2", "TLSv1.3")
    assert "Verified TLS connection established to mx.good.test[127.0.0.11]:25" in log
    # `*.wild.test` (one label in MTA-STS) reaches Postfix as `.wild.test` and matches
    assert outcomes["wild.test"][0] == "sent", outcomes["wild.test"]
    assert received["mx1.wild.test"]["tls"] in ("TLSv1.2", "TLSv1.3")
    # enforce, and the MX offers no STARTTLS: deferred, nothing in clear text
    assert outcomes["notls.test"] == ("deferred", "TLS is required, but was not offered by "
                                      "host mx.notls.test[127.0.0.12]"), outcomes["notls.test"]
    assert "mx.notls.test" not in received
    # enforce, and the MX is not one the policy names (its certificate is valid for itself)
    assert outcomes["nomatch.test"] == ("deferred", "Server certificate not verified"), \
        outcomes["nomatch.test"]
    assert "mx.other.test" not in received
    # testing: Postfix's own default (may), delivered in clear text; the policy is recorded
    assert outcomes["testing.test"][0] == "sent"
    assert received["mx.testing.test"]["tls"] == ""
    service_log = stsnet.service_log.read_text()
    assert "sts policy testing.test id=1 mode=testing" in service_log

    # ... then the policy host goes down: the cached enforce policy still applies
    stsnet.command("https-off")
    cached_id = stsnet.send("cached.test")
    assert stsnet.outcome(cached_id) == ("deferred", "TLS is required, but was not offered by "
                                         "host mx.cached.test[127.0.0.16]")
    assert "mx.cached.test" not in {m["mx"] for m in stsnet.received()}
    # a domain never seen before has no policy while its host is down: no TLS demanded
    assert stsnet.ask("fresh.test") == b"NOTFOUND "
    # the service's metrics, as Prometheus would scrape them inside the namespace
    scrape = subprocess.run(stsnet.netns.command(
        sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
        "'http://127.0.0.1:9896/metrics', timeout=10).read().decode())"),
        capture_output=True, text=True, check=True).stdout
    samples = dict(line.rsplit(" ", 1) for line in scrape.splitlines()
                   if line and not line.startswith("#"))
    assert float(samples['mailward_sts_fetches_total{outcome="ok"}']) == 6
    assert float(samples['mailward_sts_fetches_total{outcome="connect_error"}']) == 1
    assert float(samples['mailward_sts_lookups_total{answer="secure"}']) >= 5
    assert float(samples['mailward_sts_lookups_total{answer="testing"}']) >= 1
