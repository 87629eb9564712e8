"""The asyncio engine (`[milter] engine = asyncio`): the milter protocol on one event loop.

libmilter runs a thread per MTA connection and crosses from C to Python for every callback;
under load, those threads contend for the GIL. This engine speaks the protocol itself
(adapter/protocol.py) on one asyncio loop and runs mailward's adapter unchanged
(`MailwardMilter`, its callbacks, the chain, logging, metrics, the report store): only what
calls the adapter differs. `MtaContext` stands in for pymilter's context object (macros, the
reply, header edits). bench/README.md has the measurements that made it worth building.

The loop thread must never wait. MAIL, RCPT and end of message first run their checks inline
with DNS answered from the cache only (core/pipeline.py `Run`); a check that would wait for a
lookup, or for a rate-limit store in another process, stops the inline run, and a worker
thread (at most `WAIT_THREADS`) goes on from that check and replies. Meanwhile that connection
handles no further command (the MTA waits for the reply anyway) but still notices the MTA
going, which drops the stage if no worker has started it; the other connections go on.

Bounds: a packet over 1 MiB or of over 1,024 strings, a malformed packet or a command before
the option negotiation closes the connection (the MTA applies its milter_default_action,
tempfail by default); an MTA that does not read our replies is read no further, and is
disconnected once it has left them unread for `[milter] timeout` seconds. An MTA that is only
silent is kept, as Debian's libmilter keeps it: Postfix says nothing to the milter while its
client sends DATA, however long that takes, and its own timeouts end a session that stalls.
The socket is restricted as libmilter's is (adapter/milter.py `restrict`).
A stop (`stop`, after app.py's graceful drain) closes the listener and every connection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import socket as socketlib
import stat
import threading
from collections.abc import Callable

from mailward.adapter import protocol as proto
from mailward.adapter.milter import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    FLAGS,
    NOREPLY,
    REJECT,
    TEMPFAIL,
    MailwardMilter,
    Pending,
    Runtime,
    ServeError,
    restrict,
)

log = logging.getLogger(__name__)

# Worker threads for stages that must wait (DNS the cache cannot answer, Redis). Each waits
# at most the message's DNS budget; libmilter would have a thread per connection instead.
# Above Postfix's default_process_limit (100), so a stage queues for a worker only when more
# MTA processes than that wait at once. Threads start when needed and stay for reuse.
WAIT_THREADS = 128

# Bytes read at once from an MTA connection (the loop's one read buffer)
READ_SIZE = 64 * 1024

CODES = {CONTINUE: proto.CONTINUE, ACCEPT: proto.ACCEPT, REJECT: proto.REJECT,
         TEMPFAIL: proto.TEMPFAIL, DISCARD: proto.DISCARD}

# libmilter's macro stages (CI_*): getsymval searches the later ones first
MACRO_STAGES = {proto.CONNECT: 0, proto.HELO: 1, proto.MAIL: 2, proto.RCPT: 3, proto.DATA: 4,
                proto.BODYEOB: 5, proto.EOH: 6}
FAMILIES = {"4": socketlib.AF_INET, "6": socketlib.AF_INET6, "L": socketlib.AF_UNIX}


class MtaContext:
    """What pymilter's milterContext does for Milter.Base, as packets for the MTA."""

    def __init__(self) -> None:
        # per stage: the pairs as sent, decoded when first read (most never are)
        self.macros: list[dict[str, str] | bytes] = [{} for _ in MACRO_STAGES]
        self.out: list[bytes] = []
        self.reply: bytes | None = None

    def setpriv(self, _priv: object) -> None:
        pass

    def set_macros(self, command: bytes, raw: bytes) -> None:
        stage = MACRO_STAGES.get(command)
        if stage is not None:
            self.macros[stage] = raw

    def clear_message_macros(self) -> None:
        """After a message or an abort: what MAIL and later stages said is gone (libmilter)."""
        for stage in range(MACRO_STAGES[proto.MAIL], len(self.macros)):
            self.macros[stage] = {}

    def getsymval(self, name: str) -> str | None:
        """As smfi_getsymval: `{x}` also finds `x`, and `x` finds `{x}`."""
        other = (name[1] if len(name) == 3 and name[0] == "{" and name[2] == "}"
                 else f"{{{name}}}" if len(name) == 1 else None)
        for stage in range(len(self.macros) - 1, -1, -1):
            values = self.macros[stage]
            if isinstance(values, bytes):
                values = self.macros[stage] = proto.macro_pairs(values)
            if name in values:
                return values[name]
            if other is not None and other in values:
                return values[other]
        return None

    def setreply(self, code: str, xcode: str | None, message: str | None,
                 *more: str) -> None:
        if more:
            raise ValueError("multi-line replies are not used")
        self.reply = proto.reply(code, xcode, message)

    def addheader(self, name: str, value: str, index: int = -1) -> None:
        self.out.append(proto.add_header(name, value, index))

    def chgheader(self, name: str, index: int, value: str) -> None:
        self.out.append(proto.change_header(name, index, value))

    def quarantine(self, reason: str) -> None:
        self.out.append(proto.quarantine(reason))

    def answer(self, rc: int) -> bytes:
        """The header edits made since the last answer, then the reply for `rc`."""
        if rc == NOREPLY:
            return b""
        edits, self.out = b"".join(self.out), []
        reply, self.reply = self.reply, None
        if reply is not None and rc in (REJECT, TEMPFAIL):
            return edits + reply
        return edits + proto.packet(CODES.get(rc, proto.TEMPFAIL))


class Connection(asyncio.BufferedProtocol):
    """One MTA connection: packets in, the adapter's callbacks, replies out.

    A BufferedProtocol: the loop reads into the engine's one buffer (`get_buffer`), so a read
    allocates what arrived, not asyncio's 256 KiB (an mmap, mremap and munmap per read).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reader = proto.Reader()
        self.queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.ctx = MtaContext()
        self.milter: MailwardMilter | None = None
        self.steps = 0  # the protocol steps negotiated
        self.busy = False  # a worker thread has this connection's milter
        self.work: concurrent.futures.Future[int | Pending] | None = None  # its stage
        self.blocked = False  # the MTA does not read our replies (asyncio's pause_writing)
        self.stalled: asyncio.TimerHandle | None = None  # ends it if it goes on not reading
        self.lost = False

    # -- asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.engine.connections.add(self)

    def connection_lost(self, _exc: Exception | None) -> None:
        self.lost = True
        self.engine.connections.discard(self)
        if self.stalled is not None:
            self.stalled.cancel()
        if not self.busy:
            self._close_milter()  # else when the worker is done (`_done`)
        elif self.work is not None:
            self.work.cancel()  # if still queued for a worker (not once it runs): nobody
            # waits for its reply now, and others wait for that worker

    def pause_writing(self) -> None:
        """Our replies fill the socket's buffer: read nothing more from this MTA until it
        reads them, or they would pile up in memory."""
        self.blocked = True
        self.stalled = self.engine.loop.call_later(self.engine.timeout, self._stall)
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.blocked = False
        if self.stalled is not None:
            self.stalled.cancel()
        if not self.busy and not self.lost:
            assert self.transport is not None
            self.transport.resume_reading()
            self._work()

    def get_buffer(self, _sizehint: int) -> memoryview:
        return self.engine.buffer

    def buffer_updated(self, nbytes: int) -> None:
        # the loop calls this right after reading into the buffer, before any other read; the
        # Reader copies out what it keeps, so the buffer is free again when this returns
        self.received(self.engine.buffer[:nbytes])

    def received(self, data: bytes | memoryview) -> None:
        try:
            self.queue.extend(self.reader.feed(data))
        except proto.ProtocolError as exc:
            self._fail(exc)
            return
        if not self.busy and not self.blocked:
            self._work()
        elif self.busy and self.queue and self.transport is not None:
            self.transport.pause_reading()  # read no more until the worker's reply

    # -- the protocol ------------------------------------------------------------------------

    def _work(self) -> None:
        """Answer the queued commands until one must wait for a worker thread."""
        assert self.transport is not None
        out: list[bytes] = []
        try:
            while self.queue and not self.busy and not self.blocked and not self.lost:
                command, data = self.queue.popleft()
                answer = self._command(command, data)
                if answer is None:  # QUIT
                    self._send(out)
                    self.transport.close()
                    return
                out.append(answer)
        except proto.ProtocolError as exc:
            self._send(out)
            self._fail(exc)
            return
        self._send(out)

    def _send(self, out: list[bytes]) -> None:
        data = b"".join(out)
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _command(self, command: bytes, data: bytes) -> bytes | None:  # noqa: PLR0912
        if command == proto.OPTNEG:
            return self._negotiate(proto.options(data))
        m = self.milter
        if m is None:
            raise proto.ProtocolError(f"command {command!r} before the option negotiation")
        if command == proto.MACRO:
            self.ctx.set_macros(*proto.macro_block(data))
            return b""
        if command == proto.BODY:
            return self._answer(command, m.body(data))
        if command == proto.HEADER:
            return self._answer(command, m.header(*proto.header(data)))
        if command in (proto.MAIL, proto.RCPT):
            args = proto.strings(data)
            begin = m.begin_mail if command == proto.MAIL else m.begin_rcpt
            stage = "mail" if command == proto.MAIL else "rcpt"
            return self._step(command, m.guard(stage, begin, *args))
        if command == proto.BODYEOB:
            if data:
                m.body(data)
            return self._step(command, m.guard("eom", m.begin_eom))
        if command == proto.CONNECT:
            c = proto.connect(data)
            return self._answer(command, m.connect(c.hostname, FAMILIES.get(c.family, 0),
                                                   c.hostaddr))
        if command == proto.HELO:
            return self._answer(command, m.hello(proto.strings(data)[0]))
        if command == proto.ABORT:
            m.abort()
            self.ctx.clear_message_macros()
            return b""
        if command == proto.QUIT:
            return None
        if command == proto.QUIT_NC:  # the MTA's next SMTP session, on this connection
            self._close_milter()
            self.ctx = MtaContext()
            self.milter = self._new_milter()
            return b""
        if command in (proto.DATA, proto.EOH, proto.UNKNOWN):  # steps we asked to skip
            return self._answer(command, CONTINUE)
        raise proto.ProtocolError(f"unknown command {command!r}")

    def _negotiate(self, offer: proto.Options) -> bytes:
        if offer.actions & FLAGS != FLAGS:
            raise proto.ProtocolError(f"the MTA offers actions {offer.actions:#x}; mailward "
                                      f"needs {FLAGS:#x} (add, change headers, quarantine)")
        self.steps = offer.steps & ~MailwardMilter.protocol_mask()
        if self.milter is None:
            self.milter = self._new_milter()
        self.milter._protocol = self.steps
        return proto.negotiate(min(offer.version, proto.VERSION), FLAGS, self.steps)

    def _new_milter(self) -> MailwardMilter:
        milter = MailwardMilter(self.engine.runtime)
        milter._setctx(self.ctx)
        milter._actions = FLAGS
        milter._protocol = self.steps
        return milter

    def _answer(self, command: bytes, rc: int) -> bytes:
        if rc == CONTINUE and self.steps & proto.NOREPLY_BIT.get(command, 0):
            return b""  # the MTA was told not to wait for this one
        return self.ctx.answer(rc)

    def _step(self, command: bytes, step: int | Pending) -> bytes:
        """MAIL, RCPT or end of message: inline if the checks need not wait, else a worker."""
        m = self.milter
        assert m is not None
        if isinstance(step, Pending):
            step = m.proceed(step, inline=True)
        if isinstance(step, Pending):
            self.busy = True
            assert self.transport is not None
            if self.queue:  # reading on sees the MTA go (EOF); more commands must wait
                self.transport.pause_reading()
            self.work = self.engine.pool.submit(m.proceed, step)
            future = asyncio.wrap_future(self.work, loop=self.engine.loop)
            future.add_done_callback(lambda f: self._done(command, f))
            self.engine.waited += 1
            return b""
        return self._finish(command, step)

    def _finish(self, command: bytes, rc: int) -> bytes:
        answer = self.ctx.answer(rc)
        if command == proto.BODYEOB:
            assert self.milter is not None
            self.milter.end_message()
            self.ctx.clear_message_macros()
        return answer

    def _done(self, command: bytes, future: asyncio.Future[int | Pending]) -> None:
        """A worker finished a stage: reply, and go on with what the MTA sent meanwhile."""
        self.busy, self.work = False, None
        if future.cancelled():  # stopping, or the MTA has gone: it tempfails what was open
            rc: int | Pending = TEMPFAIL
        else:
            rc = future.result()  # proceed() contains exceptions: an int
        answer = self._finish(command, rc if isinstance(rc, int) else TEMPFAIL)
        if self.lost:
            self._close_milter()
            return
        assert self.transport is not None
        self._send([answer])
        if not self.blocked:
            self.transport.resume_reading()
            self._work()

    def _stall(self) -> None:
        """Drop an MTA that has left our replies unread for `timeout` (libmilter's write
        timeout). Silence alone is no reason: the MTA may be receiving a long DATA."""
        if self.blocked and not self.lost:
            log.info("milter connection: replies unread for %gs, closed",
                     self.engine.timeout)
            assert self.transport is not None
            self.transport.abort()  # close() would wait for an MTA that reads nothing

    def _fail(self, exc: Exception) -> None:
        log.warning("milter protocol error, connection closed: %s", exc)
        self.engine.runtime.metrics.errors.labels(stage="protocol").inc()
        if self.transport is not None:
            self.transport.abort()

    def _close_milter(self) -> None:
        if self.milter is not None:
            self.milter.close()
            self.milter = None


class Engine:
    """Serve the milter socket on an asyncio loop in the calling thread (`serve`) until
    `stop` is called from any thread."""

    def __init__(self, runtime: Runtime, *, socket: str, timeout: float) -> None:
        self.runtime = runtime
        self.socket = socket
        self.timeout = timeout
        self.connections: set[Connection] = set()
        self.pool = concurrent.futures.ThreadPoolExecutor(WAIT_THREADS,
                                                          thread_name_prefix="mailward-wait")
        self.waited = 0  # stages handed to a worker thread
        self.buffer = memoryview(bytearray(READ_SIZE))  # every connection reads into it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        asyncio.run(self._main(on_ready))

    def stop(self) -> None:
        """Close the listener and every connection; `serve` returns (thread-safe)."""
        self._stopping.set()
        loop, event = self._loop, self._stop
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended: nothing to stop
                loop.call_soon_threadsafe(event.set)

    async def _main(self, on_ready: Callable[[], None] | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server, path = await self._listen()
        try:
            if on_ready is not None:
                on_ready()
            if not self._stopping.is_set():
                await self._stop.wait()
        finally:
            server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            self.pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.sleep(0)  # let the aborted connections' connection_lost run
            if path:
                _unlink_socket(path)

    async def _listen(self) -> tuple[asyncio.Server, str]:
        kind, _, rest = self.socket.partition(":")
        loop = self.loop
        try:
            if kind in ("unix", "local"):
                _unlink_socket(rest)
                server = await loop.create_unix_server(lambda: Connection(self), rest,
                                                       backlog=128)
                restrict(rest)
                return server, rest
            port, _, host = rest.partition("@")
            server = await loop.create_server(lambda: Connection(self), host, int(port),
                                              backlog=128, reuse_address=True)
            return server, ""
        except OSError as exc:
            raise ServeError(f"cannot listen on {self.socket}: {exc.strerror or exc}") from None


def _unlink_socket(path: str) -> None:
    """Remove a socket left at `path` (as libmilter does); anything else there is an error."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServeError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
