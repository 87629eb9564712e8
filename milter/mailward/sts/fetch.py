"""MTA-STS discovery (RFC 8461 §3): the `_mta-sts` TXT record through mailward's resolver, the
policy file over HTTPS, and DANE's TLSA records through a validating resolver.

The HTTPS fetch trusts nothing it is sent: the host name `mta-sts.DOMAIN` is resolved with our
resolver and the certificate checked against it (the system's CAs, plus `[sts] ca_file`); a
redirect is a failure (RFC 8461 §3.3); the whole exchange has one deadline and one byte limit,
so a server that trickles bytes or sends too many is cut off; the response is parsed only once
it is in memory. Addresses that are not public (loopback, private, link-local, documentation
ranges) are not connected to unless `[sts] allow_private_addresses` says so: whoever sends
mail that bounces to their domain would otherwise have the service open connections inside
our network for them.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from mailward import __version__
from mailward.core.settings import StsSettings
from mailward.services.dns import DnsError, Resolver
from mailward.sts.policy import Policy, PolicyError, parse_policy, parse_txt

HEADER_ALLOWANCE = 16 * 1024  # response head bytes allowed on top of the policy's own limit
MAX_ADDRESSES = 4  # of mta-sts.DOMAIN tried in turn


class FetchError(Exception):
    """The policy could not be had; `outcome` is a metric label, `detail` for the log."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: IPv4 addresses inside IPv6


def is_public(address: str) -> bool:
    """Whether `address` is a public Internet address, including the IPv4 address a NAT64
    address stands for (Python counts 64:ff9b::10.1.2.3 as global)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip in NAT64:
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global


def txt_id(domain: str, resolver: Resolver) -> str | None:
    """The policy id published at `_mta-sts.DOMAIN`, or None: no usable record. A DNS failure
    raises DnsError (the caller keeps what it has)."""
    return parse_txt(resolver.txt(f"_mta-sts.{domain}"))


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _InMemory:
    """What http.client.HTTPResponse needs of a socket, over bytes already read."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


@dataclass(frozen=True)
class Fetched:
    policy: Policy
    text: str
    address: str


def fetch_policy(domain: str, resolver: Resolver, settings: StsSettings,
                 context: ssl.SSLContext) -> Fetched:
    """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt and parse it; FetchError otherwise."""
    host = f"mta-sts.{domain}"
    deadline = time.monotonic() + settings.fetch_timeout
    addresses: list[str] = []
    failure = ""
    for rtype in ("A", "AAAA"):  # one family failing does not stop the other
        try:
            addresses += [r.address for r in resolver.query(host, rtype)]
        except DnsError as exc:
            failure = str(exc)
    if not addresses:
        raise FetchError("dns_error", failure or f"{host} has no address")
    if not settings.allow_private_addresses:
        public = [a for a in addresses if is_public(a)]
        if not public:
            raise FetchError("private_address",
                             f"{host} resolves only to addresses that are not public "
                             f"({', '.join(addresses[:MAX_ADDRESSES])}): not fetched "
                             "([sts] allow_private_addresses)")
        addresses = public
    limit = settings.max_policy_size + HEADER_ALLOWANCE
    last = FetchError("connect_error", f"{host}: no address answered")
    for address in addresses[:MAX_ADDRESSES]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timeout", f"{host}: no answer within {settings.fetch_timeout:g}s")
        try:
            raw, complete = _exchange(host, address, settings.https_port, context,
                                      deadline=deadline, limit=limit)
        except FetchError as exc:
            if exc.outcome != "connect_error":
                raise
            last = exc
            continue
        policy, text = _parse_response(host, raw, complete, settings.max_policy_size)
        return Fetched(policy, text, address)
    raise last


def _exchange(host: str, address: str, port: int, context: ssl.SSLContext, *,
              deadline: float, limit: int) -> tuple[bytes, bool]:
    """The raw response, and whether the server closed before `limit` bytes."""
    try:
        sock = socket.create_connection((address, port), timeout=deadline - time.monotonic())
    except TimeoutError:
        raise FetchError("connect_error", f"{host} [{address}]:{port}: timed out") from None
    except OSError as exc:
        raise FetchError("connect_error", f"{host} [{address}]:{port}: {exc.strerror or exc}"
                         ) from None
    try:
        try:
            tls = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise FetchError("tls_error", f"{host}: certificate: {exc.verify_message}") from None
        except (ssl.SSLError, ConnectionError) as exc:
            raise FetchError("tls_error", f"{host}: {exc}") from None
        except TimeoutError:
            raise FetchError("timeout", f"{host}: TLS handshake timed out") from None
        with tls:
            request = (f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                       f"User-Agent: mailward/{__version__}\r\nAccept: text/plain\r\n"
                       "Connection: close\r\n\r\n").encode("ascii")
            chunks: list[bytes] = []
            size = 0
            try:
                tls.settimeout(max(0.001, deadline - time.monotonic()))
                tls.sendall(request)
                while size <= limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FetchError("timeout", f"{host}: response not complete in time")
                    tls.settimeout(left)
                    chunk = tls.recv(min(65536, limit + 1 - size))
                    if not chunk:
                        return b"".join(chunks), True
                    chunks.append(chunk)
                    size += len(chunk)
            except TimeoutError:
                raise FetchError("timeout", f"{host}: response not complete in time") from None
            except (ssl.SSLError, OSError) as exc:
                raise FetchError("http_error", f"{host}: {exc}") from None
            return b"".join(chunks), False
    finally:
        sock.close()


def _parse_response(host: str, raw: bytes, complete: bool, max_size: int) -> tuple[Policy, str]:
    response = http.client.HTTPResponse(_InMemory(raw))  # type: ignore[arg-type]
    try:
        response.begin()
        if 300 <= response.status < 400:
            raise FetchError("http_error", f"{host}: redirect ({response.status}) refused")
        if response.status != 200:
            raise FetchError("http_error", f"{host}: HTTP status {response.status}")
        ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise FetchError("invalid", f"{host}: Content-Type {ctype!r}, not text/plain")
        body = response.read(max_size + 1)
    except http.client.HTTPException as exc:
        outcome = "http_error" if complete else "too_large"
        raise FetchError(outcome, f"{host}: {type(exc).__name__}") from None
    if len(body) > max_size or not complete:
        raise FetchError("too_large", f"{host}: policy over {max_size} bytes")
    try:
        text = body.decode("utf-8")
        return parse_policy(text), text
    except UnicodeDecodeError:
        raise FetchError("invalid", f"{host}: policy is not UTF-8") from None
    except PolicyError as exc:
        raise FetchError("invalid", f"{host}: {exc}") from None


def dane_validated(domain: str, resolver: Resolver, validator: tuple[str, int],
                   timeout: float) -> bool:
    """Whether every MX host of `domain` has TLSA records (`_25._tcp.HOST`) that the
    validating resolver at `validator` vouches for with the AD bit. Anything less (no MX, a
    host without TLSA, an unvalidated answer, an error) is False: an unvalidated or spoofed
    TLSA record must never take the place of an MTA-STS policy."""
    try:
        hosts = [str(r.exchange).rstrip(".") for r in resolver.query(domain, "MX")]
    except DnsError:
        return False
    if not hosts or "" in hosts:
        return False
    ip, port = validator
    for host in hosts[:8]:
        query = dns.message.make_query(f"_25._tcp.{host}.", dns.rdatatype.TLSA,
                                       want_dnssec=True)
        query.flags |= dns.flags.AD
        try:
            answer = dns.query.udp(query, ip, port=port, timeout=timeout)
            if answer.flags & dns.flags.TC:
                answer = dns.query.tcp(query, ip, port=port, timeout=timeout)
        except (dns.exception.DNSException, OSError, ValueError):
            return False
        validated = bool(answer.flags & dns.flags.AD) and answer.rcode() == dns.rcode.NOERROR
        has_tlsa = any(rrset.rdtype == dns.rdatatype.TLSA for rrset in answer.answer)
        if not (validated and has_tlsa):
            return False
    return len(hosts) <= 8
