"""What mailward would cost on a milter protocol loop of its own: measurement only.

    .venv/bin/python bench/asyncmw.py [run -c] mailward.ini

Variant `mw-async` of peers.py, by hand (`--variants none,mailward,mw-async,null`), for issue
9's question whether an asyncio milter layer would beat pymilter by a margin worth building
(bench/README.md has the figures and the decision). mailward's adapter class runs unchanged
(`MailwardMilter`, its callbacks, the chain, logging, metrics, the report store); only what
calls it differs: one asyncio thread speaks the protocol and stands in for pymilter's context
object (`Ctx`: macros, replies, header edits). The chain runs inline in that thread, which is
only sound here because the bench's DNS cache is warm: a lookup that waits would stall every
connection. A real layer would hand stages that may wait to threads, bound packet sizes and
time out idle MTAs; this does none of it, and it speaks only what Postfix sends the bench.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import struct
import sys

import Milter

from mailward.adapter.milter import FLAGS, MailwardMilter
from mailward.app import App, limit_malloc_arenas
from mailward.cli import _setup_logging
from mailward.reports.hooks import Reporting

NOREPLY = Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_HDR | Milter.P_NR_BODY
SKIP = Milter.P_NOEOH | Milter.P_NODATA | Milter.P_NOUNKNOWN
CODES = {Milter.CONTINUE: b"c", Milter.ACCEPT: b"a", Milter.REJECT: b"r",
         Milter.TEMPFAIL: b"t", Milter.DISCARD: b"d"}


# ASYNCMW_POOL=N: stages that may wait (MAIL, RCPT, end of message) run in N threads
POOL = (concurrent.futures.ThreadPoolExecutor(int(os.environ["ASYNCMW_POOL"]))
        if os.environ.get("ASYNCMW_POOL") else None)


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def z(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\0"


def s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Ctx:
    """What pymilter's milterContext does for Milter.Base, over our packets."""

    def __init__(self) -> None:
        self.macros: dict[str, str] = {}
        self.out: list[bytes] = []
        self.reply: bytes | None = None

    def setpriv(self, _priv: object) -> None:
        pass

    def getsymval(self, name: str) -> str | None:
        value = self.macros.get(name)
        if value is None:
            value = self.macros.get(name[1:-1] if name.startswith("{") else f"{{{name}}}")
        return value

    def setreply(self, code: str, xcode: str, msg: str, *_more: str) -> None:
        self.reply = z(f"{code} {xcode} {msg.replace('%%', '%')}")

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        if idx < 0:
            self.out.append(packet(b"h", z(name) + z(value)))
        else:
            self.out.append(packet(b"i", struct.pack(">I", idx) + z(name) + z(value)))

    def chgheader(self, name: str, idx: int, value: str) -> None:
        self.out.append(packet(b"m", struct.pack(">I", idx) + z(name) + z(value)))

    def quarantine(self, reason: str) -> None:
        self.out.append(packet(b"q", z(reason)))


class Connection(asyncio.Protocol):
    def __init__(self, runtime: App) -> None:
        self.runtime = runtime
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.ctx = Ctx()
        self.milter = self._new()
        self.protocol = 0
        self.busy = False

    def _new(self) -> MailwardMilter:
        milter = MailwardMilter(self.runtime)
        milter._setctx(self.ctx)
        milter._actions = FLAGS
        return milter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, _exc: Exception | None) -> None:
        self.milter.close()

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.run()

    def run(self) -> None:
        assert self.transport is not None
        buf = self.buf
        pos, end, out = 0, len(buf), list[bytes]()
        while end - pos >= 4:
            (length,) = struct.unpack_from(">I", buf, pos)
            if end - pos - 4 < length:
                break
            cmd, body = buf[pos + 4:pos + 5], buf[pos + 5:pos + 4 + length]
            pos += 4 + length
            if POOL is not None and cmd in b"MRE":
                self.buf = buf[pos:]
                if out:
                    self.transport.write(b"".join(out))
                self.busy = True
                self.transport.pause_reading()
                fut = asyncio.get_running_loop().run_in_executor(POOL, self.command, cmd, body)
                fut.add_done_callback(self.done)
                return
            reply = self.command(cmd, body)
            if reply is None:
                self.transport.close()
                return
            out.append(reply)
        self.buf = buf[pos:]
        self.transport.write(b"".join(out))

    def done(self, fut: asyncio.Future[bytes | None]) -> None:
        assert self.transport is not None
        self.busy = False
        reply = fut.result()
        if reply is None or self.transport.is_closing():
            self.transport.close()
            return
        self.transport.write(reply)
        self.transport.resume_reading()
        self.run()

    def answer(self, rc: int) -> bytes:
        if rc == Milter.NOREPLY:
            return b""
        edits, self.ctx.out = b"".join(self.ctx.out), []
        if self.ctx.reply is not None and rc in (Milter.REJECT, Milter.TEMPFAIL):
            reply, self.ctx.reply = self.ctx.reply, None
            return edits + packet(b"y", reply)
        self.ctx.reply = None
        return edits + packet(CODES.get(rc, b"c"))

    def command(self, cmd: bytes, body: bytes) -> bytes | None:  # noqa: PLR0912
        m = self.milter
        if cmd == b"L":
            name, value, _ = body.split(b"\0", 2)
            return self.answer(m.header(s(name), s(value)))
        if cmd == b"B":
            return self.answer(m.body(body))
        if cmd == b"D":
            words = body[1:].split(b"\0")
            for i in range(0, len(words) - 1, 2):
                self.ctx.macros[s(words[i])] = s(words[i + 1])
            return b""
        if cmd in (b"M", b"R"):
            args = [s(a) for a in body.split(b"\0")[:-1]]
            call = m.envfrom if cmd == b"M" else m.envrcpt
            return self.answer(call(*args))
        if cmd == b"E":
            if body:
                m.body(body)
            return self.answer(m.eom())
        if cmd == b"C":
            host, _, rest = body.partition(b"\0")
            family = rest[:1]
            hostaddr: object = s(rest[1:].rstrip(b"\0"))
            if family in (b"4", b"6"):
                (port,) = struct.unpack(">H", rest[1:3])
                hostaddr = (s(rest[3:].rstrip(b"\0")), port)
            return self.answer(m.connect(s(host), family, hostaddr))
        if cmd == b"H":
            return self.answer(m.hello(s(body.rstrip(b"\0"))))
        if cmd == b"A":
            m.abort()
            return b""
        if cmd == b"O":
            _, actions, protocol = struct.unpack(">III", body[:12])
            self.protocol = (NOREPLY | SKIP | Milter.P_HDR_LEADSPC) & protocol
            m._protocol = self.protocol
            return packet(b"O", struct.pack(">III", 6, FLAGS & actions, self.protocol))
        if cmd == b"Q":
            return None
        if cmd == b"K":
            m.close()
            self.ctx = Ctx()
            self.milter = self._new()
            self.milter._protocol = self.protocol
            return b""
        return packet(b"c")


async def serve(app: App) -> None:
    path = app.config.milter.socket.partition(":")[2]
    if os.path.exists(path):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Connection(app), path, backlog=128)
    os.chmod(path, 0o666)  # noqa: S103 - the bench's private socket, for Postfix's cleanup
    async with server:
        await server.serve_forever()


def main() -> None:
    limit_malloc_arenas()
    app = App(sys.argv[-1])  # peers.py adds "run -c" before it, as for mailward
    _setup_logging(app.config.milter.log_level)
    app._reports = Reporting.start(app.config.reports, app.metrics)
    logging.getLogger("mailward").info("mailward (asyncio prototype) listening on %s",
                                       app.config.milter.socket)
    asyncio.run(serve(app))


if __name__ == "__main__":
    main()
