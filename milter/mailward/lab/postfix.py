"""A throwaway private Postfix with mailward attached, for the demo, tests and benchmarks.

Everything lives under one directory: Postfix's own config, queue and data directories, its
log (`maillog_file`), a TLS certificate made with `openssl`, mailward's config and a capture
sink that plays the next hop. Every server listens on 127.0.0.1 only. Needs root and Debian's
`postfix` package; nothing of the system's own Postfix is touched. `SenderPostfix` is a second
one, without a milter, that plays a sending MTA which retries what is refused with 4XX.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailward.lab.dns import Nameserver
from mailward.scan import parse_message

SINK_NAME = "sink.lab.test"

# mailward's config in the lab; {socket}, {metrics_port} and {dns_port} are filled in by
# MailwardProcess ({socket}: a unix socket in its directory, as in production, or TCP on
# 127.0.0.1 when given a port). No network is trusted, so mail from 127.0.0.1 counts as coming
# from the Internet unless it arrives on the submission port; DNS is the lab's own server
# (labdns), never the system's.
LAB_CONFIG = """\
[milter]
socket = {socket}
authserv_id = mx.lab.test
trusted_networks =

[check.sender]
# the lab relays inbound test mail to every domain on purpose
relay_guard = no

[dns]
nameservers = 127.0.0.1:{dns_port}
timeout = 1
lifetime = 2

[metrics]
listen = 127.0.0.1:{metrics_port}
"""


def merge_ini(base: str, extra: str) -> str:
    """`base` with the sections and keys of `extra` merged in (keys of `extra` win)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(base)
    parser.read_string(extra)
    out = []
    for section in parser.sections():
        out.append(f"[{section}]")
        out += [f"{k} = " + v.replace("\n", "\n    ") for k, v in parser[section].items()]
    return "\n".join(out) + "\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int | Path, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port` (or the unix socket)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if isinstance(port, Path):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(port))
                    return
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                where = port if isinstance(port, Path) else f"127.0.0.1:{port}"
                raise TimeoutError(f"nothing listens on {where}") from None
            time.sleep(0.05)


def missing_tools() -> list[str]:
    """Debian packages the lab needs that are not installed."""
    needed = {"postfix": "postfix", "postqueue": "postfix", "openssl": "openssl"}
    return sorted({pkg for tool, pkg in needed.items()
                   if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")})


# -- the capture sink ------------------------------------------------------------------------

@dataclass
class Captured:
    """One message as the next hop received it."""

    mail_from: str
    rcpts: list[str]
    data: bytes  # the message, or only its header when the sink does not keep bodies
    size: int = 0  # bytes of the whole message as received

    def headers(self) -> list[tuple[str, str]]:
        return parse_message(self.data)[0]


class _SinkHandler(socketserver.StreamRequestHandler):
    server: CaptureSink

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:  # noqa: PLR0912 - one flat switch over SMTP verbs reads best
        self.reply(f"220 {SINK_NAME} ESMTP capture sink")
        mail_from, rcpts = "", list[str]()
        authenticated = False
        while line := self.rfile.readline(65536):
            verb = line[:4].upper()
            arg = line[5:].strip().decode("utf-8", "replace")
            if verb == b"EHLO":
                auth = "\r\n250-AUTH PLAIN" if self.server.auth else ""
                self.reply(f"250-{SINK_NAME}{auth}\r\n250-8BITMIME\r\n250 SMTPUTF8")
            elif verb == b"AUTH" and self.server.auth:
                given = base64.b64decode(arg.partition(" ")[2] or "=", validate=False)
                ok = given.split(b"\0")[1:] == [a.encode() for a in self.server.auth]
                authenticated = ok
                self.reply("235 2.7.0 Authentication successful" if ok
                           else "535 5.7.8 Authentication credentials invalid")
            elif verb == b"MAIL" and self.server.auth and not authenticated:
                self.reply("530 5.7.0 Authentication required")
            elif verb == b"HELO":
                self.reply(f"250 {SINK_NAME}")
            elif verb == b"MAIL":
                mail_from, rcpts = arg.partition(":")[2].split(" ")[0].strip("<>"), []
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                rcpts.append(arg.partition(":")[2].split(" ")[0].strip("<>"))
                self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                chunks, size, in_body = [], 0, False
                while (chunk := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    line = chunk[1:] if chunk.startswith(b".") else chunk
                    size += len(line)
                    if self.server.keep_body or not in_body:
                        chunks.append(line)
                    in_body = in_body or line == b"\r\n"
                self.server.store(Captured(mail_from, rcpts, b"".join(chunks), size))
                self.reply("250 2.0.0 Ok: captured")
            elif verb == b"RSET":
                mail_from, rcpts = "", []
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("250 2.0.0 Ok" if verb == b"NOOP" else "502 5.5.2 Not implemented")


class CaptureSink(socketserver.ThreadingTCPServer):
    """An SMTP server on 127.0.0.1 that keeps every message it is given (with `keep_body`
    false: only the header and the size, for benchmarks that send gigabytes)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *, keep_body: bool = True,
                 auth: tuple[str, str] | None = None) -> None:
        """`auth`: (user, password) that AUTH PLAIN must give before MAIL."""
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.keep_body = keep_body
        self.auth = auth
        self.messages: list[Captured] = []
        self._cond = threading.Condition()
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, name="sink", daemon=True).start()

    def store(self, message: Captured) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Captured], bool], timeout: float = 30) -> Captured:
        """The first captured message matching `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching message reached the sink")
                self._cond.wait(left)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# -- the private Postfix ---------------------------------------------------------------------

# The services every private Postfix here runs, after its own smtpd lines.
SERVICES_CF = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
proxywrite unix - - n -  1 proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
127.0.0.1:{submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission{submission_milter}
  -o milter_macro_daemon_name=ORIGINATING
  -o cleanup_service_name=subcleanup
subcleanup unix n - n - 0 cleanup
  -o header_checks=regexp:{etc}/submission_header_checks
""" + SERVICES_CF

# `status=` of a delivery attempt in a Postfix log, with the queue id and the reason
_STATUS_RE = re.compile(r" ([0-9A-Za-z]{6,}): to=<[^>]*>.*? status=(\w+) \((.*)\)$", re.MULTILINE)
_MESSAGE_ID_RE = re.compile(r" ([0-9A-Za-z]{6,}): message-id=(\S+)$", re.MULTILINE)


def _prepare(root: Path) -> None:
    """The directories of a private Postfix under `root`, owned as Postfix wants them."""
    for d in ("etc", "queue", "data", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # noqa: S103 - Postfix (user postfix) must reach it
    shutil.chown(root / "queue", "root")
    shutil.chown(root / "data", "postfix")


def _main_cf(root: Path, *, hostname: str, relay_port: int) -> dict[str, str]:
    """main.cf settings every private Postfix here shares: its own directories and log,
    loopback only, no local delivery, everything relayed to 127.0.0.1:`relay_port`."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "meta_directory": "/etc/postfix",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": hostname,
        "mydomain": "lab.test",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_tls_security_level": "none",
        "message_size_limit": str(100 * 1024 * 1024),
        "maillog_file": str(root / "log" / "maillog"),
        "maillog_file_prefixes": str(root),
        "biff": "no",
        "delay_warning_time": "0",
        "smtpd_banner": "$myhostname ESMTP lab",
    }


class _Instance:
    """What every private Postfix here has: its directories, log, queue, start and stop."""

    root: Path

    def ports(self) -> tuple[int, ...]:
        raise NotImplementedError

    def write_config(self) -> None:
        raise NotImplementedError

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "log" / "maillog"

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True,
                              text=True, check=False)

    def start(self) -> None:
        self.write_config()
        self.postfix("set-permissions")
        done = self.postfix("start")
        if done.returncode != 0:
            tail = "\n".join(self.log_text().splitlines()[-5:])
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()}\n{tail}")
        for port in self.ports():
            wait_for_port(port)

    def stop(self) -> None:
        self.postfix("stop")
        # master waits for its children; give it a moment so the next lab can reuse names
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), 0)
                time.sleep(0.1)
                continue
            break

    def queue(self) -> list[dict[str, object]]:
        """Postfix's queue as `postqueue -j` reports it (queue_name: hold, deferred, …)."""
        out = subprocess.run(["postqueue", "-c", str(self.etc), "-j"], capture_output=True,
                             text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def held(self) -> list[dict[str, object]]:
        return [q for q in self.queue() if q.get("queue_name") == "hold"]

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def statuses(self) -> dict[str, list[tuple[str, str]]]:
        """Every delivery attempt in the log, by Message-ID: (status, reason) in order, e.g.
        ("deferred", "host 127.0.0.1[127.0.0.1] said: 451 4.7.0 … (in reply to end of DATA
        command)") then ("sent", "250 2.0.0 Ok: queued as …")."""
        text = self.log_text()
        ids = dict(_MESSAGE_ID_RE.findall(text))
        out: dict[str, list[tuple[str, str]]] = {}
        for queue_id, status, reason in _STATUS_RE.findall(text):
            out.setdefault(ids.get(queue_id, queue_id), []).append((status, reason))
        return out


@dataclass
class PostfixLab(_Instance):
    """A private Postfix under `root` relaying everything to a capture sink.

    Port `smtp_port` is an MX-like service (mail from 127.0.0.1 counts as inbound in the lab's
    mailward config); `submission_port` sets `{daemon_name}` ORIGINATING, the convention for
    submission, so mail there is outbound; its own Received field is dropped by a
    `header_checks` rule in a separate cleanup service. `message_drop_headers` is emptied so
    that Bcc reaches the milter, as it does with Sendmail.
    """

    root: Path
    milter_socket: str  # Postfix syntax, e.g. unix:/path/milter.sock or inet:127.0.0.1:8895
    sink_port: int
    main_extra: dict[str, str] = field(default_factory=dict)
    submission_milter: str = ""  # another milter for the submission service only
    smtp_port: int = field(default_factory=free_port)
    submission_port: int = field(default_factory=free_port)

    def ports(self) -> tuple[int, ...]:
        return self.smtp_port, self.submission_port

    def _make_cert(self) -> None:
        tls = self.root / "tls"
        tls.mkdir(exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=mx.lab.test", "-keyout", str(tls / "key.pem"),
             "-out", str(tls / "cert.pem")],
            check=True, capture_output=True)

    def write_config(self) -> None:
        r = self.root
        _prepare(r)
        self._make_cert()
        main = _main_cf(r, hostname="mx.lab.test", relay_port=self.sink_port) | {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(r / "tls" / "cert.pem"),
            "smtpd_tls_key_file": str(r / "tls" / "key.pem"),
            "smtpd_milters": self.milter_socket,
            "non_smtpd_milters": self.milter_socket,
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "30s",
            "milter_content_timeout": "120s",
            "message_drop_headers": "",
            # the lab's own client may claim a SASL login with XCLIENT LOGIN= (tests)
            "smtpd_authorized_xclient_hosts": "127.0.0.1",
        }
        main.update(self.main_extra)
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.etc / "master.cf").write_text(MASTER_CF.format(
            smtp_port=self.smtp_port, submission_port=self.submission_port, etc=self.etc,
            submission_milter=(f"\n  -o smtpd_milters={self.submission_milter}"
                               if self.submission_milter else "")))
        # The submission hop's own Received field (never shown to milters) is dropped by its
        # cleanup. In production match "with ESMTPSA" (authenticated); the lab has no SASL.
        (self.etc / "submission_header_checks").write_text(
            r"/^Received: .*by mx\.lab\.test \(Postfix\) with E?SMTPS?A? / IGNORE" + "\n")


@dataclass
class SenderPostfix(_Instance):
    """A second private Postfix, without a milter, that plays a sending MTA on the Internet:
    it accepts mail on 127.0.0.1:`smtp_port` and relays all of it to 127.0.0.1:`relay_port`
    (the lab's MX) in one SMTP session per message, keeping what is refused with 4XX in its
    queue and retrying a second or two later (a real MTA waits minutes). Its log tells each
    message's fate: `statuses()`.
    """

    root: Path
    relay_port: int
    smtp_port: int = field(default_factory=free_port)

    def ports(self) -> tuple[int, ...]:
        return (self.smtp_port,)

    def write_config(self) -> None:
        _prepare(self.root)
        main = _main_cf(self.root, hostname="sender.lab.test", relay_port=self.relay_port) | {
            "syslog_name": "postfix-sender",
            "queue_run_delay": "1s",
            # Not 1s: qmgr takes a deferred file once it is at most 1 s in the future, so a
            # message deferred with 1s may be picked up again while its smtp process still
            # holds the file's lock, and a locked file is set aside for 60 s
            # (qmgr_active.c, QMGR_MESSAGE_LOCKED). 2s retries it 1 to 2 s later.
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "3s",
            "smtp_connect_timeout": "5s",
            # one SMTP session per delivery: a cached session would keep what the lab's smtpd
            # knew when it opened (a milter that was down, a config since reloaded)
            "smtp_connection_cache_on_demand": "no",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.etc / "master.cf").write_text(
            f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd\n" + SERVICES_CF)


# -- mailward as a subprocess ----------------------------------------------------------------

@dataclass
class MailwardProcess:
    """`mailward run` as a child process with a config written for the lab.

    The milter listens on TCP 127.0.0.1:`port`, or with `port = 0` on the unix socket
    `socket_path` in `workdir` (mode 0660, group postfix: see adapter/milter.py `serve`).
    """

    config_text: str
    workdir: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    dns_port: int = 53
    env: dict[str, str] = field(default_factory=dict)  # added to the child's environment
    # how to run mailward: this Python's, or e.g. ["/usr/bin/mailward"] (the Debian package)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "mailward"])
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "milter.sock"

    @property
    def milter_socket(self) -> str:
        """The socket in mailward's syntax ([milter] socket)."""
        return f"inet:{self.port}@127.0.0.1" if self.port else f"unix:{self.socket_path}"

    @property
    def postfix_socket(self) -> str:
        """The socket in Postfix's syntax (smtpd_milters)."""
        return f"inet:127.0.0.1:{self.port}" if self.port else f"unix:{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mailward.log"

    def config_path(self) -> Path:
        return self.workdir / "mailward.ini"

    def write(self, text: str | None = None) -> None:
        if text is not None:
            self.config_text = text
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # Postfix (user postfix) must reach the socket
        text = self.config_text.format(socket=self.milter_socket, port=self.port,
                                       metrics_port=self.metrics_port, dns_port=self.dns_port)
        # the report store in this directory, unless the config says where
        text = merge_ini(f"[reports]\nsqlite_path = {self.workdir / 'reports.sqlite'}\n", text)
        # MAILWARD_TEST_ENGINE: the milter engine, unless the config says which (the suite
        # runs once with each: Makefile)
        engine = os.environ.get("MAILWARD_TEST_ENGINE")
        if engine:
            text = merge_ini(f"[milter]\nengine = {engine}\n", text)
        self.config_path().write_text(text)

    def start(self) -> None:
        self.write()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "run", "-c", str(self.config_path())],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(self.port or self.socket_path)
        except TimeoutError:
            self.stop()
            raise RuntimeError("mailward did not start:\n" + self.log()) from None

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean-up, connections cut mid-transaction."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Lab:
    """Everything `running_lab` started."""

    postfix: PostfixLab
    mailward: MailwardProcess
    sink: CaptureSink
    dns: Nameserver


@contextlib.contextmanager
def running_lab(config_text: str, *, root: Path | None = None, zone: str = "",
                main_extra: dict[str, str] | None = None,
                submission_milter: str = "",
                command: list[str] | None = None) -> Iterator[Lab]:
    """Start a DNS server (serving `zone`), sink, mailward and Postfix; stop all on exit.

    Postfix reaches mailward over a unix socket, as the reference configuration does.
    """
    owned = root is None
    root = root or Path(tempfile.mkdtemp(prefix="mailward-lab-"))
    os.chmod(root, 0o755)  # noqa: S103 - Postfix (user postfix) must reach it
    ns = Nameserver()
    if zone:
        ns.load_zone(zone)
    sink = CaptureSink()
    mw = MailwardProcess(config_text, root / "mailward", port=0, dns_port=ns.port)
    if command is not None:
        mw.command = command
    lab = PostfixLab(root / "postfix", mw.postfix_socket, sink.port, main_extra or {},
                     submission_milter)
    try:
        mw.start()
        lab.start()
        yield Lab(lab, mw, sink, ns)
    finally:
        lab.stop()
        mw.stop()
        sink.close()
        ns.close()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
