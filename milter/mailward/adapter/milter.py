"""The pymilter adapter: translate callbacks into Transactions and Verdicts back into replies.

It records what the MTA says, asks the core (`pipeline.evaluate`) at MAIL, RCPT and end of
message, and applies the answer. It owns no policy. This is the only module that imports
`Milter`. Each connection takes the services snapshot current when it opens and keeps it until
it closes (core/snapshot.py); each transaction gets one DNS budget for all its stages.

MAIL, RCPT and end of message come in two halves: `begin_*` builds the stage's `Pending`
evaluation, `proceed` finishes it and applies the verdict. pymilter's callbacks (`envfrom`,
`envrcpt`, `eom`) do both at once in libmilter's thread; the asyncio engine (adapter/aio.py)
first runs the checks inline on cached DNS answers and hands what would wait to a thread.

Facts it relies on (Postfix 3.7, pymilter 1.0.5): TLS and auth macros are sent at HELO/MAIL,
never at end of message, so they are read in `envfrom`; the queue id `{i}` is only certain at
end of message; the client address comes from `connect()`, not `{client_addr}`.
"""

from __future__ import annotations

import dataclasses
import functools
import grp
import ipaddress
import logging
import os
import socket as socketlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import Milter

from mailward.adapter.drain import Drain
from mailward.core import pipeline
from mailward.core.outcomes import DmarcOutcome
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import (
    Body,
    IPAddress,
    Stage,
    Tls,
    Transaction,
    index_headers,
    strip_brackets,
)
from mailward.core.verdict import (
    Action,
    AddHeader,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    Quarantine,
    Result,
    Verdict,
)
from mailward.services.dns import Budget
from mailward.services.metrics import DMARC_POLICIES, Metrics

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# The actions we may ask of the MTA (negotiated once in `serve`).
FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE

# Typed names for pymilter's untyped constants and decorator.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL
DISCARD: int = Milter.DISCARD
NOREPLY: int = Milter.NOREPLY
noreply: Callable[[F], F] = Milter.noreply


class Runtime(Protocol):
    """What the adapter needs from the application: the current snapshot, the metrics and
    the gate a graceful stop closes."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def drain(self) -> Drain: ...

    @property
    def reports(self) -> ReportHooks | None: ...


class ReportHooks(Protocol):
    """What the adapter tells the report store (reports/hooks.py); none of it may raise."""

    @property
    def max_message(self) -> int: ...

    def judged(self, tx: Transaction, verdict: Verdict) -> None: ...

    def wants(self, tx: Transaction) -> bool: ...

    def received(self, tx: Transaction, verdict: Verdict, raw: bytes) -> None: ...


# The answer to a message of more than [milter] max_header_fields header fields: it will not
# change on a retry, and judging it without all its fields (a forged Authentication-Results
# among those dropped, say) is not an option.
TOO_MANY_FIELDS = ("552", "5.3.4", "Message header has too many fields")

# The answer to MAIL FROM while mailward is stopping: 421 makes Postfix end the session, so
# the client retries later (or at another MX) on a new connection.
STOPPING_REPLY = ("421", "4.3.2", "Service shutting down, try again later")


class ServeError(Exception):
    """libmilter could not open or serve the socket."""


def _nodelay_listeners() -> int:
    """Set TCP_NODELAY on this process's listening TCP sockets; return how many.

    libmilter leaves Nagle on. At end of message it writes each header edit and the verdict
    as separate small packets; with Nagle the second waits for Postfix's delayed ACK (40 ms on
    Linux). Setting it took bench/throughput.py (10 messages per connection, TCP) from 44 to
    81 msg/s. Sockets accepted later inherit the option from the listener (Linux).
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socketlib.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                listening = sock.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_ACCEPTCONN)
                if (listening and sock.type == socketlib.SOCK_STREAM
                        and sock.family in (socketlib.AF_INET, socketlib.AF_INET6)):
                    sock.setsockopt(socketlib.IPPROTO_TCP, socketlib.TCP_NODELAY, 1)
                    count += 1
            except OSError:
                continue
    return count


def restrict(path: str) -> None:
    """Give the milter's unix socket mode 0660 and, when the group exists, group `postfix`.

    Postfix's smtpd and cleanup run as user postfix: only the MTA and our own user may
    connect, so no other local user can have mail judged or signed. Without a group `postfix`
    (a Sendmail host) the group stays ours.
    """
    try:
        os.chmod(path, 0o660)
    except OSError as exc:
        raise ServeError(f"cannot set mode 0660 on {path}: {exc.strerror}") from None
    try:
        gid = grp.getgrnam("postfix").gr_gid
    except KeyError:
        return  # no Postfix here: the socket keeps our group
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        log.warning("cannot give %s to group postfix (%s): Postfix can connect only if "
                    "user postfix is in our group; or make its directory group postfix "
                    "with the setgid bit (chmod 2750)", path, exc.strerror)


def serve(runtime: Runtime, *, socket: str, timeout: int,
          on_ready: Callable[[], None] | None = None) -> None:
    """Register the milter class with libmilter and serve until a stop signal.

    `on_ready` is called once the socket is open and restricted (`restrict`), before the
    first connection. A TCP socket gets TCP_NODELAY.
    """
    Milter.factory = lambda: MailwardMilter(runtime)
    Milter.set_flags(FLAGS)
    opensocket = Milter.milter.opensocket

    def open_socket(rmsock: bool) -> Any:
        # runmilter opens the socket, then blocks in main(): the one moment to reach it
        done = opensocket(rmsock)
        kind, _, path = socket.partition(":")
        if kind in ("unix", "local"):
            restrict(path)
        elif socket.startswith("inet"):
            log.debug("TCP_NODELAY set on %d listening socket(s)", _nodelay_listeners())
        if on_ready is not None:
            on_ready()
        return done

    Milter.milter.opensocket = open_socket
    try:
        Milter.runmilter("mailward", socket, timeout=timeout)
    except Milter.milter.error as exc:
        raise ServeError(str(exc)) from None


def stop_serving() -> None:
    """Have libmilter stop: it closes the socket and every connection, and `serve` returns
    (libmilter notices within its listener's poll interval, a few seconds)."""
    Milter.milter.stop()


class Libmilter:
    """The engine of `[milter] engine = libmilter`: libmilter's thread per connection."""

    def __init__(self, runtime: Runtime, *, socket: str, timeout: float) -> None:
        self.runtime = runtime
        self.socket = socket
        self.timeout = timeout

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        # libmilter takes whole seconds, and 0 would mean its default (two hours)
        serve(self.runtime, socket=self.socket, timeout=max(1, round(self.timeout)),
              on_ready=on_ready)

    def stop(self) -> None:
        stop_serving()


def _guarded(stage: str) -> Callable[[F], F]:
    """Contain any exception of a callback (`MailwardMilter.guard`)."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(self: MailwardMilter, *args: Any) -> Any:
            return self.guard(stage, func, self, *args)

        return inner  # type: ignore[return-value]

    return wrap


@dataclasses.dataclass
class Pending:
    """A stage (`mail`, `rcpt` or `eom`) whose checks have not all run: `run.advance()` runs
    them, then `then()` applies the verdict and gives the reply (`MailwardMilter.proceed`)."""

    stage: str
    run: pipeline.Run
    then: Callable[[], int]


def _address(hostaddr: Any) -> IPAddress | None:
    """The client address from connect()'s hostaddr: (ip, port[, flow, scope]) or a path."""
    if isinstance(hostaddr, tuple) and hostaddr:
        try:
            return ipaddress.ip_address(str(hostaddr[0]).split("%")[0])
        except ValueError:
            return None
    return None


def _utf8(value: str) -> str:
    """`value` as pymilter can pass it on (UTF-8 only). Header bytes that were not UTF-8 came
    in as surrogate escapes: a value built from them (e.g. a rewritten Received field) gets
    U+FFFD in their place rather than an exception that would tempfail the message forever."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


@Milter.header_leading_space
class MailwardMilter(Milter.Base):  # type: ignore[misc]
    """One instance per MTA connection."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.snapshot = runtime.snapshot  # a reload applies from the next connection on
        self.config = self.snapshot.config
        self.budget = Budget(self.config.dns.budget)
        self.conn = Transaction(stage=Stage.CONNECT)
        self.tx = self.conn
        self.headers: list[tuple[str, str]] = []
        self.spool: Body | None = None
        self.conn_failed = ""
        self.msg_failed = ""
        self.spool_error = ""
        self.fields_over = 0  # header fields past [milter] max_header_fields
        self.connected = False
        self.in_transaction = False  # admitted by runtime.drain, not yet ended

    @property
    def queue_id(self) -> str:
        return self.tx.queue_id or "-"

    # -- callbacks ---------------------------------------------------------------------------

    @noreply
    @_guarded("connect")
    def connect(self, hostname: str, family: Any, hostaddr: Any) -> int:
        if not self.connected:  # a second CONNECT (a broken peer) is not a second client
            self.connected = True
            self.runtime.metrics.connections_active.inc()
        self.conn = Transaction(stage=Stage.CONNECT, client_ip=_address(hostaddr),
                                client_name=hostname or "",
                                daemon_name=self.getsymval("{daemon_name}") or "")
        self.tx = self.conn
        return CONTINUE

    @noreply
    @_guarded("helo")
    def hello(self, helo: str) -> int:
        self.conn = dataclasses.replace(self.conn, helo=helo or "")
        return CONTINUE

    @_guarded("mail")
    def envfrom(self, mail_from: str, *params: str) -> int:
        return self.settle(self.begin_mail(mail_from, *params))

    def begin_mail(self, mail_from: str, *params: str) -> int | Pending:
        self._reset()
        self.budget = Budget(self.config.dns.budget)  # one per transaction
        if self.conn_failed:
            return self._reply(self.config.policy.error_reply, TEMPFAIL)
        if not self.runtime.drain.admit():
            log.info("client=%s from=<%s> refused: mailward is stopping",
                     self.conn.client_ip or self.conn.client_name or "-",
                     strip_brackets(mail_from))
            self.setreply(*STOPPING_REPLY)
            return TEMPFAIL
        self.in_transaction = True
        version = self.getsymval("{tls_version}")
        tls = None
        if version:
            tls = Tls(version=version, cipher=self.getsymval("{cipher}") or "",
                      bits=self.getsymval("{cipher_bits}") or "")
        self.tx = dataclasses.replace(
            self.conn, tls=tls, auth_user=self.getsymval("{auth_authen}") or "",
            auth_type=self.getsymval("{auth_type}") or "",
            queue_id=self.getsymval("i") or "",
            mail_from=strip_brackets(mail_from), mail_params=tuple(params))

        def judged(rc: int) -> int:
            if rc != CONTINUE:
                self._reset()  # refused: no transaction is open
            return rc

        return self._early(Stage.MAIL, self.tx, judged)

    @_guarded("rcpt")
    def envrcpt(self, rcpt: str, *params: str) -> int:
        return self.settle(self.begin_rcpt(rcpt, *params))

    def begin_rcpt(self, rcpt: str, *params: str) -> int | Pending:
        recipients = (*self.tx.recipients, strip_brackets(rcpt))
        candidate = dataclasses.replace(self.tx, recipients=recipients)

        def judged(rc: int) -> int:
            if rc == CONTINUE:
                self.tx = candidate
            return rc

        return self._early(Stage.RCPT, candidate, judged)

    @noreply
    @_guarded("header")
    def header(self, name: str, value: str) -> int:
        if len(self.headers) < self.config.milter.max_header_fields:
            self.headers.append((name, value))
        else:  # kept no more: refused at end of message
            self.fields_over += 1
        return CONTINUE

    @noreply
    @_guarded("body")
    def body(self, chunk: bytes) -> int:
        if self.msg_failed or self.fields_over:
            return CONTINUE  # end of message refuses it: the body need not be kept
        if self.spool is None:
            self.spool = Body(threshold=self.config.milter.spool_threshold,
                              directory=self.config.milter.spool_dir)
        try:
            self.spool.write(chunk)
        except OSError as exc:  # e.g. ENOSPC: the spool's disk is full (logged at eom)
            self.runtime.metrics.errors.labels(stage="body").inc()
            self.msg_failed = "body"
            self.spool_error = str(exc)
        return CONTINUE

    @_guarded("eom")
    def eom(self) -> int:
        try:
            return self.settle(self.begin_eom())
        finally:
            self._reset()

    def begin_eom(self) -> int | Pending:
        """End of message; whoever calls it calls `end_message` once the reply is sent."""
        if self.msg_failed:
            if self.spool_error:
                log.error("qid=%s cannot spool the body (%s): message tempfailed",
                          self.getsymval("i") or self.queue_id, self.spool_error)
            return self._reply(self.config.policy.error_reply, TEMPFAIL)
        if self.fields_over:
            return self._too_many_fields()
        tx = dataclasses.replace(self.tx, headers=index_headers(self.headers),
                                 body=self.spool,
                                 queue_id=self.getsymval("i") or self.tx.queue_id)
        self.tx = tx
        run = pipeline.Run(Stage.EOM, tx, self.snapshot, budget=self.budget,
                           observe=self._observe)

        def judged() -> int:
            tx, verdict = run.verdict()
            self._count(tx, verdict)
            self._log(tx, verdict)
            code = self._apply(verdict)
            self._report(tx, verdict)
            return code

        return Pending("eom", run, judged)

    def _too_many_fields(self) -> int:
        limit = self.config.milter.max_header_fields
        direction = pipeline.classify(self.tx, self.config)
        self.runtime.metrics.messages.labels(direction=str(direction),
                                             verdict=str(Action.REJECT)).inc()
        log.info("qid=%s client=%s direction=%s from=<%s> message refused: %d header fields, "
                 "more than [milter] max_header_fields (%d)",
                 self.getsymval("i") or self.queue_id,
                 self.tx.client_ip or self.tx.client_name or "-", direction,
                 self.tx.mail_from, limit + self.fields_over, limit)
        self.setreply(*TOO_MANY_FIELDS)
        return REJECT

    def end_message(self) -> None:
        """The message is over (after `begin_eom`'s reply): close its transaction."""
        self.guard("eom", self._reset)

    @_guarded("abort")
    def abort(self) -> int:
        self._reset()
        return CONTINUE

    @_guarded("close")
    def close(self) -> int:
        self._reset()
        if self.connected:
            self.runtime.metrics.connections_active.dec()
            self.connected = False
        return CONTINUE

    # -- helpers -----------------------------------------------------------------------------

    def _reset(self) -> None:
        if self.in_transaction:
            self.in_transaction = False
            self.runtime.drain.done()
        if self.spool is not None:
            self.spool.close()
        self.spool = None
        self.headers = []
        self.fields_over = 0
        self.msg_failed = ""
        self.spool_error = ""
        self.tx = self.conn

    def _observe(self, check: str, result: CheckResult, seconds: float) -> None:
        self.runtime.metrics.observe_check(check, seconds)

    # -- the two halves of a stage ----------------------------------------------------------

    def guard(self, stage: str, func: Callable[..., Any], *args: Any) -> Any:
        """`func(*args)`, containing any exception: count it, answer tempfail (or, where the
        MTA takes no reply, remember to at the next stage that can), keep serving."""
        try:
            return func(*args)
        except Exception:
            log.exception("qid=%s unexpected error in %s", self.queue_id, stage)
            self.runtime.metrics.errors.labels(stage=stage).inc()
            # These callbacks may not reply (noreply): the next one that can will.
            if stage in ("abort", "close"):
                return CONTINUE
            if stage in ("connect", "helo"):
                self.conn_failed = stage
                return CONTINUE
            if stage in ("header", "body"):
                self.msg_failed = stage
                return CONTINUE
            return self._reply(self.config.policy.error_reply, TEMPFAIL)

    def proceed(self, step: Pending, *, inline: bool = False) -> int | Pending:
        """Run `step`'s remaining checks and reply; with `inline`, `step` itself when a check
        would wait (pipeline.Run.advance)."""
        return self.guard(step.stage, self._proceed, step, inline)  # type: ignore[no-any-return]

    @staticmethod
    def _proceed(step: Pending, inline: bool) -> int | Pending:
        if not step.run.advance(inline=inline):
            return step
        return step.then()

    def settle(self, step: int | Pending) -> int:
        """`step`'s reply, its checks run here, waiting for DNS as long as it takes."""
        while isinstance(step, Pending):
            step.run.advance()
            step = step.then()
        return step

    def _early(self, stage: Stage, tx: Transaction, judged: Callable[[int], int]) -> Pending:
        """The checks of MAIL or RCPT; `judged` gets the reply code."""
        run = pipeline.Run(stage, tx, self.snapshot, budget=self.budget, observe=self._observe)
        return Pending(stage.name.lower(), run, lambda: judged(self._judge_early(run)))

    def _judge_early(self, run: pipeline.Run) -> int:
        """Act only on a reject or tempfail."""
        tx, verdict = run.verdict()
        stage = tx.stage
        if verdict.action is Action.ACCEPT or verdict.reply is None:
            return CONTINUE
        m = self.runtime.metrics
        for r in verdict.results:
            if r.check == verdict.decided_by:
                m.check_results.labels(check=r.check, result=str(r.result)).inc()
        if stage is Stage.RCPT:
            m.recipients_rejected.labels(check=verdict.decided_by).inc()
            what = f"rcpt=<{tx.recipients[-1]}>"
        else:
            m.messages.labels(direction=str(tx.direction), verdict=str(verdict.action)).inc()
            what = "message"
        log.info("qid=%s client=%s direction=%s from=<%s> %s refused at %s by %s: %s",
                 self.queue_id, tx.client_ip or tx.client_name, tx.direction, tx.mail_from,
                 what, stage.name.lower(), verdict.decided_by, verdict.reply)
        code = REJECT if verdict.action is Action.REJECT else TEMPFAIL
        return self._reply(verdict.reply, code)

    def _reply(self, reply: Any, code: int) -> int:
        self.setreply(str(reply.code), reply.status, reply.text.replace("%", "%%"))
        return int(code)

    def _apply(self, verdict: Verdict) -> int:
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            code = REJECT if verdict.action is Action.REJECT else TEMPFAIL
            return self._reply(verdict.reply, code)
        if verdict.action is Action.DISCARD:
            return DISCARD
        # With SMFIP_HDR_LEADSPC negotiated the MTA adds no space after the colon itself.
        lead = " " if self._protocol & Milter.P_HDR_LEADSPC else ""
        for edit in verdict.edits:
            if isinstance(edit, DeleteHeader):
                self.chgheader(edit.name, edit.index, "")
            elif isinstance(edit, ChangeHeader):
                self.chgheader(edit.name, edit.index, _utf8(lead + edit.value.lstrip()))
            elif isinstance(edit, AddHeader):
                if edit.top:
                    self.addheader(edit.name, _utf8(lead + edit.value), 0)
                else:
                    self.addheader(edit.name, _utf8(lead + edit.value))
        if verdict.action is Action.QUARANTINE and verdict.quarantine is Quarantine.HOLD:
            self.quarantine(verdict.quarantine_reason or "mailward")
        return ACCEPT

    def _report(self, tx: Transaction, verdict: Verdict) -> None:
        """The final outcome to the report store; report mail to the inbox. Never raises."""
        hooks = self.runtime.reports
        if hooks is None:
            return
        try:
            hooks.judged(tx, verdict)
            if verdict.action in (Action.ACCEPT, Action.QUARANTINE) and hooks.wants(tx):
                raw = self._raw_message(tx, hooks.max_message)
                if raw is not None:
                    hooks.received(tx, verdict, raw)
        except Exception:
            log.exception("qid=%s: reports: not recorded", tx.queue_id)

    def _raw_message(self, tx: Transaction, limit: int) -> bytes | None:
        """The message as received (header and body), or None past `limit` bytes."""
        head = b"".join(f"{name}:{value}\r\n".encode("utf-8", "surrogateescape")
                        for name, value in self.headers)
        if tx.body is None:
            return head + b"\r\n"
        if len(head) + tx.body.size > limit:
            log.warning("qid=%s report mail of %d bytes not read (max_ingest_size %d)",
                        tx.queue_id, len(head) + tx.body.size, limit)
            return None
        return head + b"\r\n" + b"".join(tx.body.chunks())

    def _count(self, tx: Transaction, verdict: Verdict) -> None:
        m = self.runtime.metrics
        m.messages.labels(direction=str(tx.direction), verdict=str(verdict.action)).inc()
        for r in verdict.results:
            m.count_result(r.check, str(r.result))
            if r.would is not None:
                m.monitor_actions.labels(check=r.check, action=str(r.would)).inc()
            if isinstance(r.outcome, DmarcOutcome) and r.outcome.result is Result.FAIL:
                policy = r.outcome.applied if r.outcome.applied in DMARC_POLICIES else "none"
                m.dmarc_failures.labels(policy=policy).inc()

    def _log(self, tx: Transaction, verdict: Verdict) -> None:
        checks = " ".join(f"{r.check}={r.result}" + (f"(would {r.would})" if r.would else "")
                          for r in verdict.results)
        reply = f" reply=\"{verdict.reply}\"" if verdict.reply else ""
        quarantine = (f" quarantine={verdict.quarantine} reason=\"{verdict.quarantine_reason}\""
                      if verdict.action is Action.QUARANTINE else "")
        user = f" user={tx.auth_user}" if tx.auth_user else ""
        sealers = [r.outcome.arc_override for r in verdict.results
                   if isinstance(r.outcome, DmarcOutcome) and r.outcome.arc_override]
        override = f" dmarc_override=arc:{sealers[0]}" if sealers else ""
        log.info("qid=%s client=%s%s direction=%s from=<%s> rcpts=%d %s%s verdict=%s%s%s gen=%d",
                 self.queue_id, tx.client_ip or tx.client_name or "-", user, tx.direction,
                 tx.mail_from, len(tx.recipients), checks, override, verdict.action, reply,
                 quarantine, self.snapshot.generation)
