"""A real DNS server on 127.0.0.1 for the lab (tests, demo, benchmarks): UDP and TCP on one
port, records from zone text or added one by one.

Failure modes: names in `drop` are never answered (a timeout), names in `servfail` get
SERVFAIL, names in `garbage` get bytes that are no DNS message. UDP answers larger than 512
bytes (or the client's EDNS size) are truncated (TC), so clients must retry over TCP, as with
a real server.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 {minimum}"


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Nameserver:
    """Serve rrsets added with `add` or `load_zone`; `queries` logs (name, type, transport)."""

    def __init__(self, *, negative_ttl: int = 60, port: int = 0) -> None:
        """Listen on `port` (UDP and TCP), or on a port free for both when it is 0; a given
        port lets a test stop the server and start another in its place."""
        self.rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self.drop: set[str] = set()
        # names whose queries time out unless the name has records of the asked type
        self.drop_missing: set[str] = set()
        self.servfail: set[str] = set()
        self.garbage: set[str] = set()  # names answered with bytes that are no DNS message
        # names answered with the AD bit, as a validating resolver says "DNSSEC-validated"
        self.validated: set[str] = set()
        self.delay = 0.0  # seconds before every answer (a slow server), without blocking others
        self.queries: list[tuple[str, str, str]] = []
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                while head := conn.recv(2):
                    (length,) = struct.unpack("!H", head)
                    wire = b""
                    while len(wire) < length:
                        chunk = conn.recv(length - len(wire))
                        if not chunk:
                            return
                        wire += chunk
                    reply = server.respond(wire, "tcp")
                    if reply is None:
                        return
                    time.sleep(server.delay)
                    conn.sendall(struct.pack("!H", len(reply)) + reply)

        # UDP and TCP on one port number: take a free UDP port, then try TCP on it
        wanted = port
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", wanted))
            port = int(udp.getsockname()[1])
            try:
                tcp = _TCPServer(("127.0.0.1", port), Handler)
            except OSError:
                udp.close()
                if wanted:
                    raise
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP on 127.0.0.1")
        self._udp, self._tcp, self.port = udp, tcp, port
        threading.Thread(target=self._tcp.serve_forever, daemon=True).start()
        threading.Thread(target=self._serve_udp, daemon=True).start()

    # -- data -----------------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self.rrsets.clear()
            self.drop.clear()
            self.drop_missing.clear()
            self.servfail.clear()
            self.garbage.clear()
            self.validated.clear()
            self.delay = 0.0
            self.queries.clear()

    def add(self, name: str, rtype: str, *values: str, ttl: int = 300) -> None:
        """Add records, e.g. add("example.com", "TXT", '"v=spf1 -all"')."""
        rrset = dns.rrset.from_text(dns.name.from_text(name), ttl, "IN", rtype, *values)
        with self._lock:
            key = (rrset.name, rrset.rdtype)
            if key in self.rrsets:
                self.rrsets[key].union_update(rrset)  # type: ignore[no-untyped-call]
            else:
                self.rrsets[key] = rrset

    def add_rdata(self, name: str, rdata: dns.rdata.Rdata, ttl: int = 300) -> None:
        """Add one record built by the caller (e.g. TXT strings with arbitrary bytes)."""
        rrset = dns.rrset.from_rdata(dns.name.from_text(name), ttl, rdata)
        with self._lock:
            key = (rrset.name, rrset.rdtype)
            if key in self.rrsets:
                self.rrsets[key].add(rdata)
            else:
                self.rrsets[key] = rrset

    def load_zone(self, text: str, origin: str = ".") -> None:
        """Add every record of zone-file text (a default TTL of 300 unless it sets $TTL)."""
        if "$TTL" not in text:
            text = "$TTL 300\n" + text
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
        for name, ttl, rdata in zone.iterate_rdatas():
            self.add(name.to_text(), dns.rdatatype.to_text(rdata.rdtype), rdata.to_text(),
                     ttl=ttl)

    def count(self, name: str, rtype: str | None = None) -> int:
        """How many queries for `name` (and `rtype`) reached the server."""
        n = name.lower().rstrip(".") + "."
        return sum(1 for q, t, _ in self.queries if q == n and (rtype is None or t == rtype))

    # -- serving --------------------------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        return any(n == name or n.is_subdomain(name) for n, _ in self.rrsets)

    def respond(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        text = qname.to_text().lower()
        with self._lock:
            self.queries.append((text, dns.rdatatype.to_text(qtype), transport))
            dropped = text.rstrip(".") in self.drop or (
                text.rstrip(".") in self.drop_missing and (qname, qtype) not in self.rrsets)
            servfail = text.rstrip(".") in self.servfail
        if dropped:
            return None
        if text.rstrip(".") in self.garbage:
            return wire[:2] + b"\x81\x80" + b"\xff" * 40  # our id, then nonsense
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if text.rstrip(".") in self.validated:
            response.flags |= dns.flags.AD
        if servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        with self._lock:
            name = qname
            for _ in range(8):  # follow CNAMEs inside our data
                found = self.rrsets.get((name, qtype))
                cname = self.rrsets.get((name, dns.rdatatype.CNAME))
                if found is not None:
                    response.answer.append(found)
                    break
                if cname is not None and qtype != dns.rdatatype.CNAME:
                    response.answer.append(cname)
                    name = cname[0].target
                    continue
                if not response.answer:
                    if not self._exists(name):
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    soa = SOA.format(minimum=self.negative_ttl)
                    response.authority.append(dns.rrset.from_text(
                        "test.", self.negative_ttl, "IN", "SOA", soa))
                break
        out = response.to_wire()
        limit = max(512, query.payload if query.edns >= 0 else 512)
        if transport == "udp" and len(out) > limit:
            response.answer.clear()
            response.flags |= dns.flags.TC
            out = response.to_wire()
        return out

    def _serve_udp(self) -> None:
        while True:
            try:
                wire, addr = self._udp.recvfrom(65535)
            except OSError:
                return
            try:
                reply = self.respond(wire, "udp")
            except Exception:  # noqa: S112 - a malformed query gets no answer, like a real server
                continue
            if reply is not None and self.delay > 0:
                threading.Timer(self.delay, self._send, (reply, addr)).start()
            elif reply is not None:
                self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # closed meanwhile
            self._udp.sendto(reply, addr)

    def close(self) -> None:
        self._tcp.shutdown()
        self._tcp.server_close()
        self._udp.close()
