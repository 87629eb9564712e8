"""A private Sendmail from Debian's own packages, for the tests (never installed).

Debian's `sendmail-bin` conflicts with `postfix` as an installed package, so the lab fetches
`sendmail-bin` and `sendmail-cf` with `apt-get download`, unpacks them with `dpkg -x` into a
cache directory (once), builds a `.cf` with `m4` from the unpacked cf/ tree and runs the daemon
from there: `sendmail -C FILE -bD` (in the foreground), in a UTS namespace of its own whose host
name is mx.lab.test, because an unqualified host name makes Sendmail sleep a minute at start-up
trying to qualify it. It listens on 127.0.0.1 only (an MTA port and an MSA port), resolves host
names from its own hosts file (no DNS), relays every message to the capture sink and calls
mailward through `INPUT_MAIL_FILTER`. Sendmail refuses a milter socket or a queue below a
world-writable directory such as /tmp, hence `LAB_ROOT`. Needs root, `m4` and `libwrap0`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mailward.lab.postfix import free_port, wait_for_port

CACHE = Path(os.environ.get("MAILWARD_LAB_CACHE", "/var/cache/mailward-lab"))
LAB_ROOT = Path("/var/lib/mailward-lab")
PACKAGES = ("sendmail-bin", "sendmail-cf")
BINARY = Path("usr/libexec/sendmail/sendmail")
CF_DIR = Path("usr/share/sendmail/cf")
HOSTNAME = "mx.lab.test"


def missing_tools() -> list[str]:
    """Debian packages the private Sendmail needs that are not installed."""
    missing = [pkg for pkg in ("m4", "libwrap0")
               if subprocess.run(["dpkg-query", "-W", "-f", "${Status}", pkg],
                                 capture_output=True, text=True,
                                 check=False).stdout != "install ok installed"]
    for tool, pkg in (("unshare", "util-linux"), ("openssl", "openssl")):
        if not shutil.which(tool):
            missing.append(pkg)
    return missing


def unpack(cache: Path = CACHE) -> Path:
    """The unpacked packages' root directory, fetched and unpacked on first use."""
    root = cache / "sendmail"
    if (root / BINARY).exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *PACKAGES]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run(download, cwd=tmp, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # no package lists yet on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            done = subprocess.run(download, cwd=tmp, capture_output=True, text=True,
                                  check=False)
        debs = sorted(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) != len(PACKAGES):
            raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed:\n"
                               f"{done.stderr}")
        staging = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
        staging.rename(root)
    return root


def lab_directory() -> Path:
    """A fresh directory for one lab, below no world-writable directory."""
    LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(LAB_ROOT, 0o755)  # noqa: S103 - Postfix and Sendmail must reach sockets below it
    path = Path(tempfile.mkdtemp(prefix="sendmail-", dir=LAB_ROOT))
    os.chmod(path, 0o755)  # noqa: S103
    return path


@dataclass
class SendmailLab:
    """Sendmail on 127.0.0.1:`port` (daemon name MTA) and `msa_port` (MSA, the submission
    daemon's default name), with mailward at `milter` (Sendmail's syntax: local:/path or
    inet:PORT@HOST), relaying to the sink on `sink_port`."""

    root: Path
    milter: str
    sink_port: int
    packages: Path = field(default_factory=unpack)
    port: int = field(default_factory=free_port)
    msa_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def cf_path(self) -> Path:
        return self.root / "sendmail.cf"

    def _make_cert(self) -> None:
        tls = self.root / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={HOSTNAME}", "-keyout", str(tls / "key.pem"),
             "-out", str(tls / "cert.pem")], check=True, capture_output=True)
        os.chmod(tls / "key.pem", 0o600)  # Sendmail refuses a key others may read

    def mc(self) -> str:
        """The m4 source of the configuration (what an administrator would write)."""
        r = self.root
        return f"""\
divert(-1)
# mailward's lab Sendmail: loopback only, no DNS, everything relayed to the capture sink.
divert(0)dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{HOSTNAME}')dnl
define(`confSERVICE_SWITCH_FILE', `{r}/service.switch')dnl
define(`confHOSTS_FILE', `{r}/hosts')dnl
define(`QUEUE_DIR', `{r}/mqueue')dnl
define(`STATUS_FILE', `{r}/statistics')dnl
define(`confPID_FILE', `{r}/sendmail.pid')dnl
define(`ALIAS_FILE', `{r}/aliases')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0s')dnl
define(`confDELIVERY_MODE', `background')dnl
define(`SMART_HOST', `[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {self.sink_port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {self.sink_port}')dnl
define(`confCACERT_PATH', `{r}/tls')dnl
define(`confCACERT', `{r}/tls/cert.pem')dnl
define(`confSERVER_CERT', `{r}/tls/cert.pem')dnl
define(`confSERVER_KEY', `{r}/tls/key.pem')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`nocanonify')dnl
DAEMON_OPTIONS(`Port={self.port}, Addr=127.0.0.1, Name=MTA')dnl
DAEMON_OPTIONS(`Port={self.msa_port}, Addr=127.0.0.1, Name=MSA, M=E')dnl
INPUT_MAIL_FILTER(`mailward', `S={self.milter}, F=T, T=C:10s;S:30s;R:30s;E:5m')dnl
MAILER(`smtp')dnl
"""

    def write_config(self) -> None:
        r = self.root
        (r / "mqueue").mkdir(mode=0o700, exist_ok=True)
        (r / "hosts").write_text(f"127.0.0.1 {HOSTNAME} localhost\n")
        (r / "service.switch").write_text("hosts files\naliases files\n")
        (r / "aliases").write_text("")
        (r / "lab.mc").write_text(self.mc())
        cf = self.packages / CF_DIR
        done = subprocess.run(["m4", f"-D_CF_DIR_={cf}/", str(cf / "m4" / "cf.m4"),
                               str(r / "lab.mc")], capture_output=True, text=True, check=False)
        if done.returncode != 0 or done.stderr.strip():
            raise RuntimeError(f"m4 could not build sendmail.cf:\n{done.stderr}")
        self.cf_path.write_text(done.stdout)

    def start(self) -> None:
        self._make_cert()
        self.write_config()
        binary = self.packages / BINARY
        self.proc = subprocess.Popen(
            ["unshare", "--uts", "sh", "-c",
             f'hostname {HOSTNAME} && exec "$0" -C "$1" -bD', str(binary), str(self.cf_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
            wait_for_port(self.msa_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("Sendmail did not start (it logs to syslog only; try "
                               f"{binary} -C {self.cf_path} -bD -d0.1 by hand)") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def queue(self) -> list[str]:
        """The queue files left (qf*: messages not yet delivered)."""
        return sorted(p.name for p in (self.root / "mqueue").glob("qf*"))

