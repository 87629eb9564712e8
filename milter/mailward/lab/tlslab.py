"""A test CA and an HTTPS server for MTA-STS policies, for tests and the lab.

`TestCA(directory)` makes a CA (ca.pem) and issues leaf certificates for given names.
`PolicyServer` serves `/.well-known/mta-sts.txt` over HTTPS for any number of `mta-sts.DOMAIN`
hosts on one address (the certificate names them all), each with what a test wants it to say:
a policy, a status, a redirect, a wrong Content-Type, a body too large or a trickle.
"""

from __future__ import annotations

import datetime
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TestCA:
    """A private CA under `directory`: ca.pem, and NAME.pem / NAME.key per leaf issued."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailward lab test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._name = name
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False), critical=True)
                     .sign(self._key, hashes.SHA256()))
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, names: list[str]) -> tuple[Path, Path]:
        """A leaf certificate for `names` (DNS SANs); returns (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self._name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        cert_path, key_path = self.directory / f"{label}.pem", self.directory / f"{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


@dataclass
class Site:
    """What one mta-sts host answers."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain"
    location: str = ""  # a redirect's target
    trickle: float = 0.0  # seconds between the body's bytes


class PolicyServer(ThreadingHTTPServer):
    """HTTPS on (`host`, `port`); `sites[hostname]` says what each Host gets (404 otherwise);
    `hits` counts requests per host."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cert: Path, key: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.port = int(self.server_address[1])
        self.sites: dict[str, Site] = {}
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, name="policy-https", daemon=True).start()

    def policy(self, domain: str, text: str) -> None:
        self.sites[f"mta-sts.{domain}"] = Site(text.encode())

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: PolicyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        with self.server._lock:
            self.server.hits[host] = self.server.hits.get(host, 0) + 1
        site = self.server.sites.get(host)
        if site is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        self.send_response(site.status)
        self.send_header("Content-Type", site.content_type)
        if site.location:
            self.send_header("Location", site.location)
        self.send_header("Content-Length", str(len(site.body)))
        self.end_headers()
        if site.trickle:
            for i in range(len(site.body)):
                self.wfile.write(site.body[i:i + 1])
                self.wfile.flush()
                time.sleep(site.trickle)
        else:
            self.wfile.write(site.body)
