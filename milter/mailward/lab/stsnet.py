"""A private network for MTA-STS tests: a network namespace holding the lab DNS on port 53,
HTTPS policy hosts on :443 and MX hosts on :25 of loopback addresses (127.0.0.x), so that a
Postfix in the same namespace looks up MX records and delivers as on the Internet, and
nothing leaves the test's own host.

`Netns` makes and removes the namespace (`ip netns`, with its own /etc/netns/NAME/resolv.conf
naming 127.0.0.1, which `ip netns exec` puts in place of /etc/resolv.conf). The servers run in
one child process inside it, `python -m mailward.lab.stsnet SPEC.json`, which prints `ready`,
then obeys lines on its standard input (`https-off`, `quit`). Each message an MX host takes is
written to the capture directory as JSON, with the address it arrived at and the TLS version
(empty when in clear text).
"""

from __future__ import annotations

import json
import shutil
import socketserver
import ssl
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import SERVICES_CF, _Instance, _main_cf, _prepare
from mailward.lab.tlslab import PolicyServer


class Netns:
    """A network namespace with loopback up and its own resolv.conf."""

    def __init__(self, prefix: str = "mwsts") -> None:
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.etc = Path("/etc/netns") / self.name
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True,
                           capture_output=True)
            self.etc.mkdir(parents=True)
            (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
        except BaseException:
            self.close()
            raise

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


def available() -> str:
    """Why network namespaces cannot be used here, or "" when they can."""
    if shutil.which("ip") is None:
        return "the ip command is missing (iproute2)"
    try:
        probe = Netns("mwprobe")
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot make a network namespace: {exc}"
    probe.close()
    return ""


# -- inside the namespace -----------------------------------------------------------------------

class _MxHandler(socketserver.StreamRequestHandler):
    server: MxServer

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        name, tls = self.server.hostname, ""
        self.reply(f"220 {name} ESMTP lab MX")
        mail_from, rcpts = "", list[str]()
        while line := self.rfile.readline(65536):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                offer = "\r\n250-STARTTLS" if self.server.context and not tls else ""
                self.reply(f"250-{name}{offer}\r\n250 8BITMIME")
            elif verb == b"STAR" and self.server.context and not tls:
                self.reply("220 2.0.0 Ready to start TLS")
                conn = self.server.context.wrap_socket(self.connection, server_side=True)
                tls = str(conn.version())
                self.connection = conn
                self.rfile = conn.makefile("rb")
                self.wfile = conn.makefile("wb")
            elif verb == b"MAIL":
                mail_from, rcpts = line[10:].strip().split(b" ")[0].strip(b"<>").decode(), []
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                rcpts.append(line[8:].strip().split(b" ")[0].strip(b"<>").decode())
                self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.reply("354 go on")
                data = b""
                while (chunk := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b".") else chunk
                self.server.capture({"mx": self.server.hostname, "ip": self.server.ip,
                                     "tls": tls, "mail_from": mail_from, "rcpts": rcpts,
                                     "data": data.decode("utf-8", "replace")})
                self.reply("250 2.0.0 Ok: captured")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("250 2.0.0 Ok")


class MxServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ip: str, hostname: str, capture_dir: Path,
                 cert: str = "", key: str = "") -> None:
        super().__init__((ip, 25), _MxHandler)
        self.ip, self.hostname, self.capture_dir = ip, hostname, capture_dir
        self.context: ssl.SSLContext | None = None
        if cert:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert, key)
        self._n = 0
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def capture(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._n += 1
            path = self.capture_dir / f"{self.hostname}-{self._n}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(item))
        tmp.rename(path)


def serve(spec: dict[str, Any]) -> None:
    """Run what `spec` describes until `quit` or end of input."""
    dns = Nameserver(port=53)
    dns.load_zone(spec["zone"])
    capture = Path(spec["capture_dir"])
    https = []
    for h in spec["https"]:
        server = PolicyServer(Path(h["cert"]), Path(h["key"]), host=h["ip"], port=443)
        for domain, text in h["policies"].items():
            server.policy(domain, text)
        https.append(server)
    mxs = [MxServer(m["ip"], m["hostname"], capture, m.get("cert", ""), m.get("key", ""))
           for m in spec["mx"]]
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "https-off":
            for server in https:
                server.close()
            https.clear()
        elif command == "quit":
            break
        print(f"ok {command}", flush=True)
    for mx in mxs:
        mx.shutdown()
    dns.close()



# -- a sending Postfix inside the namespace ---------------------------------------------------

@dataclass
class OutboundPostfix(_Instance):
    """A private Postfix in `netns` that delivers by MX lookup (no relayhost: the next-hop
    domain is the TLS-policy lookup key), asks `policy_map` for each domain's TLS policy and
    trusts the lab CA. Mail goes in through its `sendmail` (pickup), so it needs no smtpd."""

    root: Path
    netns: Netns
    policy_map: str
    ca_file: str

    def ports(self) -> tuple[int, ...]:
        return ()

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.netns.command("postfix", "-c", str(self.etc), *args),
                              capture_output=True, text=True, check=False)

    def write_config(self) -> None:
        _prepare(self.root)
        main = _main_cf(self.root, hostname="out.lab.test", relay_port=25) | {
            "syslog_name": "postfix-out",
            "relayhost": "",
            "smtp_host_lookup": "dns",
            "smtp_tls_security_level": "may",
            "smtp_tls_policy_maps": self.policy_map,
            "smtp_tls_CAfile": self.ca_file,
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "5s",
            "smtp_connection_cache_on_demand": "no",
            "minimal_backoff_time": "1h",  # a deferred message stays deferred for the test
            "maximal_backoff_time": "2h",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.etc / "master.cf").write_text(SERVICES_CF)

    def submit(self, sender: str, recipient: str, message: bytes) -> None:
        subprocess.run(["sendmail", "-C", str(self.etc), "-f", sender, recipient],
                       input=message, check=True, capture_output=True, timeout=30)


if __name__ == "__main__":
    serve(json.loads(Path(sys.argv[1]).read_text()))
