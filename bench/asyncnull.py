"""What pymilter's protocol layer costs: nullmilter.py's milter on an asyncio loop of its own.

    .venv/bin/python bench/asyncnull.py unix:/path/null.sock

Measurement only (variant `null-async` of peers.py, by hand: `--variants none,null,null-async`),
for issue 9's question whether a milter protocol layer of our own would beat pymilter's
(bench/README.md has the figures). It does what nullmilter.py does, in one thread, for
Postfix only: negotiates the same callbacks, no-reply flags, leading space and actions, keeps
the header fields, counts body bytes and adds `X-Null-Milter` at end of message. It trusts
the MTA (no bounds on packet size, no timeouts), so it is no basis for a milter that faces
anything but a benchmark.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys

# SMFIP_NR_CONN | NR_HELO | NR_HDR | NR_BODY: no reply to connect, HELO, headers, body
NOREPLY = 0x1000 | 0x2000 | 0x80 | 0x80000
SKIP = 0x40 | 0x200 | 0x100  # SMFIP_NOEOH | NODATA | NOUNKNOWN: callbacks mailward lacks
LEADSPC = 0x100000  # SMFIP_HDR_LEADSPC
ACTIONS = 0x1 | 0x10 | 0x20  # SMFIF_ADDHDRS | CHGHDRS | QUARANTINE
SILENT = frozenset(b"DCHA")  # macros, connect, HELO, abort: no reply


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


CONTINUE = packet(b"c")
ACCEPT = packet(b"a")


class Null(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.lead = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        pos, end, out = 0, len(buf), []
        while end - pos >= 4:
            (length,) = struct.unpack_from(">I", buf, pos)
            if end - pos - 4 < length:
                break
            reply = self.command(buf[pos + 4], buf[pos + 5:pos + 4 + length])
            pos += 4 + length
            if reply is None:
                self.transport.close()
                return
            out.append(reply)
        self.buf = buf[pos:]
        self.transport.write(b"".join(out))

    def command(self, cmd: int, body: bytes) -> bytes | None:
        if cmd == ord("L"):
            name, value, _ = body.split(b"\0", 2)
            self.headers.append((name, value))
            return b""
        if cmd == ord("B"):
            self.size += len(body)
            return b""
        if cmd in SILENT or cmd == ord("K"):
            return b""
        if cmd == ord("M"):
            self.headers, self.size = [], 0
            return CONTINUE
        if cmd == ord("E"):
            value = self.lead + f"{len(self.headers)} fields, {self.size} bytes".encode()
            return packet(b"h", b"X-Null-Milter\0" + value + b"\0") + ACCEPT
        if cmd == ord("O"):
            _, actions, protocol = struct.unpack(">III", body[:12])
            mine = (NOREPLY | SKIP | LEADSPC) & protocol
            self.lead = b" " if mine & LEADSPC else b""
            return packet(b"O", struct.pack(">III", 6, ACTIONS & actions, mine))
        if cmd == ord("Q"):
            return None
        return CONTINUE  # RCPT, and anything else that wants an answer


async def serve(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(Null, path, backlog=128)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].startswith("unix:"):
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    asyncio.run(serve(sys.argv[1].partition(":")[2]))
