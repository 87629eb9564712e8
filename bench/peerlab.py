"""The pieces of bench/peers.py: its private network, DNS on 127.0.0.1:53, the signed
corpus, smtp-sink and smtp-source, the four milter set-ups (none, mailward, OpenDKIM +
OpenDMARC, the null pymilter milter), and CPU and memory figures read from /proc.

Everything listens on 127.0.0.1 (of the bench's own network namespace) or on unix sockets under
one private directory; every process is started here and stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import NoReturn

import dkim as dkimpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "milter"))

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import LAB_CONFIG, MailwardProcess, free_port, merge_ini, wait_for_port
from mailward.services import keys

DOMAIN = "example.org"
SELECTOR = "bench"
SENDER = f"bench@{DOMAIN}"
RECIPIENT = "rcpt@example.net"
HELO = f"mail.{DOMAIN}"
# The address the SMTP client (and every other loopback client) comes from inside the bench's
# network namespace, instead of 127.0.0.1: libspf2, behind OpenDMARC's SPFSelfValidate, passes
# any client on 127.0.0.1 without looking at SPF ("localhost always gets a free ride"), and
# mailward would then be the only one doing SPF. A documentation address (RFC 5737).
CLIENT = "192.0.2.10"
AUTHSERV_ID = "mx.lab.test"  # mailward's (LAB_CONFIG) and, set alike, OpenDKIM's/OpenDMARC's
# Another documentation address replaces the 127.0.0.1 default of OpenDKIM's InternalHosts
# and OpenDMARC's IgnoreHosts: mail from the lab must be verified, not signed (OpenDKIM) or
# skipped (OpenDMARC).
NOT_LOOPBACK = "192.0.2.1/32"
PSL = "/usr/share/publicsuffix/public_suffix_list.dat"
NULLMILTER = Path(__file__).resolve().parent / "nullmilter.py"


# -- the private network -------------------------------------------------------------------

WORK_ENV = "MAILWARD_PEERS_WORK"

NAMESPACE_SETUP = f"""\
ip link set lo up
ip addr add {CLIENT}/32 dev lo
ip route replace local 127.0.0.1 dev lo table local proto kernel scope host src {CLIENT}
mount --bind "$0/resolv.conf" /etc/resolv.conf
mount --bind "$0/hosts" /etc/hosts
exec "$@"
"""


def enter_namespaces(work: Path, argv: list[str]) -> NoReturn:
    """Run `argv` (this script again) in its own network and mount namespaces, in place of
    this process (unshare and sh exec: the PID stays). In there only a loopback interface
    exists; connections to 127.0.0.1 come from `CLIENT`; 127.0.0.1:53 is ours (OpenDMARC
    resolves through /etc/resolv.conf, which takes no port); /etc/resolv.conf says 127.0.0.1
    and /etc/hosts names `CLIENT` (Postfix's client lookup needs no DNS). The host's network
    and files are not touched."""
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (work / "hosts").write_text(f"127.0.0.1 localhost\n{CLIENT} {HELO}\n")
    os.environ[WORK_ENV] = str(work)
    os.execvp("unshare", ["unshare", "--net", "--mount",  # noqa: S606 - fixed argv, no shell input
                          "--propagation", "private", "sh", "-c", NAMESPACE_SETUP, str(work),
                          *argv])


# -- DNS -----------------------------------------------------------------------------------

def nameserver_on(port: int, *, negative_ttl: int) -> Nameserver:
    """The lab's Nameserver on 127.0.0.1:`port` (53, for OpenDMARC's resolver)."""
    try:
        return Nameserver(negative_ttl=negative_ttl, port=port)
    except OSError as exc:
        raise SystemExit(f"cannot serve DNS on 127.0.0.1:{port} ({exc.strerror})") from None


def zone(key: keys.SigningKey) -> str:
    """The sender domain: SPF (also for the HELO name) allowing the client, DMARC p=reject,
    the DKIM key. A day's TTL so that no cache expires during a run."""
    spf = f'"v=spf1 ip4:{CLIENT} -all"'
    return (f"$TTL 86400\n{DOMAIN}. TXT {spf}\n{HELO}. TXT {spf}\n{HELO}. A {CLIENT}\n"
            f'_dmarc.{DOMAIN}. TXT "v=DMARC1; p=reject"\n{keys.zone_line(key)}\n')


# -- the corpus ----------------------------------------------------------------------------

TEXT_LINE = b"The quick brown fox jumps over the lazy dog; mailward compares with its peers.\r\n"
B64_LINE = b"TWFpbHdhcmQgcGVlcnMgYmVuY2htYXJrOiBhIGxhcmdlIGF0dGFjaG1lbnQgbGluZSBvZiBiYXNlNjQK\r\n"


def signed_message(key: keys.SigningKey, tag: str, *, total: int = 0, body: int = 0) -> bytes:
    """A DKIM-signed (rsa-sha256, relaxed/relaxed) message From the sender domain, CRLF lines:
    `total` bytes in all (4 KB corpus: text), or a body of `body` bytes (base64-like lines,
    as an attachment would be)."""
    head = (f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: peers benchmark {tag}\r\n"
            f"Date: {formatdate(localtime=False)}\r\nMessage-ID: <peers-{tag}@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = B64_LINE if body else TEXT_LINE
    size = body or max(len(line), total - len(head) - 560)  # ~560: the 2048-bit signature
    text = (line * (size // len(line) + 1))[:size - 2] + b"\r\n"
    message = head + text
    sig = dkimpy.sign(message, SELECTOR.encode(), DOMAIN.encode(), key.material,
                      canonicalize=(b"relaxed", b"relaxed"),
                      include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                       b"mime-version", b"content-type"])
    return bytes(sig) + message


def write_for_smtp_source(path: Path, message: bytes) -> None:
    """smtp-source -F reads lines and sends each with CRLF (and dot-stuffs): LF on disk. It
    also sends one empty line more at the end, which relaxed body canonicalization ignores."""
    path.write_bytes(message.replace(b"\r\n", b"\n"))


# -- /proc -----------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, user+sys seconds of the process and its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / TICK


def proc_table() -> dict[int, tuple[int, float]]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                table[int(entry.name)] = got
    return table


def tree_cpu(roots: Iterable[int], table: dict[int, tuple[int, float]] | None = None) -> float:
    """User+sys seconds of the processes `roots` and all their live descendants, each with
    its reaped children: a delta of two readings counts every process of the tree that ran
    in between, also those that ended (their parent in the tree has reaped them)."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, [p for p in roots if p in table], set[int]()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo += children.get(pid, [])
    return total


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / TICK


def hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def reset_hwm(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- smtp-sink and smtp-source ------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, dumping every message it accepts to its own file
    (-d): the files are the deliveries, counted and checked after each measured window."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.dump = root / "dump"
        self.dump.mkdir()
        shutil.chown(self.dump, "postfix", "postfix")  # smtp-sink runs as postfix (-u)
        self.port = free_port()
        with open(root / "smtp-sink.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["smtp-sink", "-4", "-u", "postfix", "-h", "sink.lab.test", "-d",
                 f"{self.dump}/m.", f"127.0.0.1:{self.port}", "256"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_for_port(self.port)

    def files(self) -> list[Path]:
        return [Path(e.path) for e in os.scandir(self.dump)]

    def clear(self) -> None:
        for path in self.files():
            path.unlink()

    def stop(self) -> None:
        stop_process(self.proc)


REJECTED = re.compile(r"rejected: ([245])\d\d")


def smtp_source(port: int, message_file: Path, count: int, sessions: int,
                log: Path) -> subprocess.Popen[bytes]:
    """Postfix's smtp-source: `count` messages over `sessions` parallel SMTP sessions, one
    message per session (HELO, MAIL, RCPT, DATA, QUIT); -A: a refusal is logged to stderr
    ("... rejected: 550 ...") and the session goes on instead of aborting the program."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            ["smtp-source", "-A", "-4", "-s", str(sessions), "-m", str(count), "-F",
             str(message_file), "-f", SENDER, "-t", RECIPIENT, "-M", HELO,
             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=err)


def refusals(log: Path) -> int:
    """Messages smtp-source saw refused (4xx or 5xx at MAIL, RCPT, DATA or end of data)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines() if REJECTED.search(line))


class Maillog:
    """Follows a private Postfix's maillog: deliveries (status=sent) and milter refusals,
    to tell when a window's last message has left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.sent = self.refused = self.deferred = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.rest = b""
        self.sent = self.refused = self.deferred = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if b" status=sent " in line:
                self.sent += 1
            elif b"milter-reject:" in line:
                self.refused += 1
            elif b" status=deferred " in line or b" status=bounced " in line:
                self.deferred += 1


# -- the dumps -------------------------------------------------------------------------------

def header_fields(path: Path, limit: int = 1 << 16) -> tuple[list[tuple[str, str]], int]:
    """The header fields of one smtp-sink dump (its own X-* and Received first), unfolded,
    and the file's size."""
    with open(path, "rb") as fh:
        head = fh.read(limit)
        size = os.fstat(fh.fileno()).st_size
    text = head.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields, size


def results(fields: list[tuple[str, str]]) -> list[str]:
    return [v for n, v in fields if n.lower() == "authentication-results"]


def has(value: str, method: str, result: str = "pass") -> bool:
    return re.search(rf"(^|[;\s]){method}={result}\b", value) is not None


# -- the milter set-ups ----------------------------------------------------------------------

@dataclass
class Milters:
    """No milter (the baseline): Postfix alone."""

    root: Path
    name: str = "none"
    title: str = "no milter"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def smtpd_milters(self) -> str:
        return ""

    def start(self, dns_port: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def alive(self) -> str:
        """'' when every milter process runs, else which one ended."""
        dead = [f"{n} (exit {p.returncode})" for n, p in self.procs.items()
                if p.poll() is not None]
        return ", ".join(dead)

    def check(self, fields: list[tuple[str, str]]) -> str:
        """'' if the delivered copy carries this set-up's results, else what is missing."""
        return "" if any(n.lower() == "dkim-signature" for n, _ in fields) else "no signature"


@dataclass
class Mailward(Milters):
    """mailward's full default inbound chain, LAB_CONFIG (nothing trusted), unix socket."""

    name: str = "mailward"
    title: str = "mailward (full default chain)"
    process: MailwardProcess | None = None
    config: str = LAB_CONFIG  # the report store on (SQLite in the work directory), as shipped
    env: dict[str, str] = field(default_factory=dict)

    @property
    def smtpd_milters(self) -> str:
        return f"unix:{self.root / 'milter.sock'}"

    def start(self, dns_port: int) -> None:
        super().start(dns_port)
        command = self.command()  # first: it may add to the environment
        self.process = MailwardProcess(self.config, self.root, port=0, dns_port=dns_port,
                                       env=self.env, command=command)
        self.process.start()
        assert self.process.proc is not None
        self.procs["mailward"] = self.process.proc

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mailward"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def check(self, fields: list[tuple[str, str]]) -> str:
        ours = [v for v in results(fields) if v.lower().startswith(AUTHSERV_ID + ";")]
        if not ours:
            return f"no Authentication-Results: {AUTHSERV_ID};"
        missing = [m for m in ("spf", "dkim", "dmarc") if not any(has(v, m) for v in ours)]
        return " ".join(f"no {m}=pass" for m in missing)


@dataclass
class MailwardNoReports(Mailward):
    """The same, with `[reports] store = off`: what recording DMARC outcomes costs."""

    name: str = "mw-norep"
    title: str = "mailward, reports off"
    config: str = merge_ini(LAB_CONFIG, "[reports]\nstore = off\n")


# Where the Debian package puts the libraries it bundles (packaging/debian/vendor.txt)
DEB_PRIVATE = Path("/usr/lib/mailward/python")


@dataclass
class MailwardDebian(Mailward):
    """The same code (working tree, or --at REV) run as the .deb runs it: Debian 12's
    /usr/bin/python3, its python3-* packages and the libraries the package bundles."""

    name: str = "mw-deb"
    title: str = "mailward on Debian's python3 and libraries (.deb)"

    def command(self) -> list[str]:
        if not DEB_PRIVATE.is_dir():
            raise RuntimeError(f"{DEB_PRIVATE} is missing: install the .deb first (make bench "
                               "does), or leave out the variant mw-deb")
        source = os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1]
                                                     / "milter")
        self.env = {**self.env, "PYTHONPATH": os.pathsep.join([source, str(DEB_PRIVATE)])}
        return ["/usr/bin/python3", "-m", "mailward"]


@dataclass
class MailwardLibmilter(Mailward):
    """The same, on the libmilter engine: pymilter's thread per connection."""

    name: str = "mw-libmilter"
    title: str = "mailward on libmilter ([milter] engine = libmilter)"
    config: str = merge_ini(LAB_CONFIG, "[milter]\nengine = libmilter\n")


@dataclass
class MailwardExperiment(Mailward):
    """EXPERIMENT: mailward with $BENCH_MW_ENV (K=V,...) and $BENCH_MW_INI merged in."""

    name: str = "mw-exp"
    title: str = "mailward, experiment"
    config: str = merge_ini(LAB_CONFIG, os.environ.get("BENCH_MW_INI", "").replace("\\n", "\n"))
    env: dict[str, str] = field(default_factory=lambda: dict(
        kv.split("=", 1) for kv in os.environ.get("BENCH_MW_ENV", "").split(",") if kv))


@dataclass
class NullMilter(Milters):
    """bench/nullmilter.py: pymilter with mailward's callbacks, no policy, one header."""

    name: str = "null"
    title: str = "null pymilter milter"
    script: Path = NULLMILTER

    @property
    def smtpd_milters(self) -> str:
        return f"unix:{self.root / 'null.sock'}"

    def start(self, dns_port: int) -> None:
        super().start(dns_port)
        sock = self.root / "null.sock"
        with open(self.root / "nullmilter.log", "ab") as log:
            self.procs["nullmilter"] = subprocess.Popen(
                [sys.executable, str(self.script), f"unix:{sock}"], stdout=log, stderr=log)
        wait_for_port(sock)
        sock.chmod(0o666)  # the bench's private socket, for Postfix's cleanup

    def check(self, fields: list[tuple[str, str]]) -> str:
        return "" if any(n.lower() == "x-null-milter" for n, _ in fields) else "no X-Null-Milter"


@dataclass
class AsyncNull(NullMilter):
    """PROTOTYPE: bench/asyncnull.py, the null milter on an asyncio protocol loop."""

    name: str = "null-async"
    title: str = "null milter, asyncio protocol"
    script: Path = Path(__file__).with_name("asyncnull.py")


OPENDKIM_CONF = """\
# OpenDKIM as a verifier only, for the peers benchmark
Mode                v
Socket              local:{run}/opendkim.sock
PidFile             {run}/opendkim.pid
UMask               000
Syslog              no
AuthservID          {authserv_id}
# the default InternalHosts is 127.0.0.1: mail from there would be signed, not verified
InternalHosts       {hosts}
ExternalIgnoreList  {hosts}
# the loopback DNS server (libunbound forwards to it; no trust anchor: no DNSSEC)
Nameservers         127.0.0.1
MinimumKeyBits      1024
"""

OPENDMARC_CONF = """\
# OpenDMARC for the peers benchmark: reads OpenDKIM's result, checks SPF itself
Socket              local:{run}/opendmarc.sock
PidFile             {run}/opendmarc.pid
UMask               000
Syslog              false
AuthservID          {authserv_id}
TrustedAuthservIDs  {authserv_id}
# the default is 127.0.0.1: mail from there would not be evaluated at all
IgnoreHosts         {hosts}
SPFSelfValidate     true
RejectFailures      true
PublicSuffixList    {psl}
"""


@dataclass
class CChain(Milters):
    """OpenDKIM (verify) then OpenDMARC (SPF itself, OpenDKIM's result from its A-R field).

    OpenDKIM (built with libunbound) is pointed at the loopback DNS server by `Nameservers`.
    OpenDMARC has no such option: libopendmarc and the libspf2 behind SPFSelfValidate use the
    system resolver, i.e. /etc/resolv.conf, which takes no port; in the bench's namespaces
    (`enter_namespaces`) that file names 127.0.0.1, where the DNS server listens on port 53.
    """

    name: str = "c-chain"
    title: str = "OpenDKIM + OpenDMARC"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def smtpd_milters(self) -> str:
        return f"unix:{self.run / 'opendkim.sock'}, unix:{self.run / 'opendmarc.sock'}"

    def start(self, dns_port: int) -> None:
        if dns_port != 53:
            raise ValueError("OpenDMARC can only reach a DNS server on port 53")
        super().start(dns_port)
        self.run.mkdir(exist_ok=True)
        self.run.chmod(0o755)
        hosts = self.root / "not-loopback-hosts"
        hosts.write_text(NOT_LOOPBACK + "\n")
        values = {"run": self.run, "hosts": hosts, "authserv_id": AUTHSERV_ID, "psl": PSL}
        (self.root / "opendkim.conf").write_text(OPENDKIM_CONF.format(**values))
        (self.root / "opendmarc.conf").write_text(OPENDMARC_CONF.format(**values))
        with open(self.root / "opendkim.log", "ab") as log:
            self.procs["opendkim"] = subprocess.Popen(
                ["opendkim", "-f", "-x", str(self.root / "opendkim.conf")],
                stdout=log, stderr=log)
        with open(self.root / "opendmarc.log", "ab") as log:
            self.procs["opendmarc"] = subprocess.Popen(
                ["opendmarc", "-f", "-c", str(self.root / "opendmarc.conf")],
                stdout=log, stderr=log)
        for sock in ("opendkim.sock", "opendmarc.sock"):
            try:
                wait_for_port(self.run / sock)
            except TimeoutError:
                logs = "".join((self.root / f"{n}.log").read_text(errors="replace")
                               for n in ("opendkim", "opendmarc"))
                raise RuntimeError(f"{sock} did not appear:\n{logs}") from None

    def check(self, fields: list[tuple[str, str]]) -> str:
        ar = results(fields)
        missing = [m for m in ("dkim", "dmarc") if not any(has(v, m) for v in ar)]
        return " ".join(f"no {m}=pass" for m in missing)

    def spf_passes(self, fields: list[tuple[str, str]]) -> bool:
        return any(has(v, "spf") for v in results(fields))


def settle(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
