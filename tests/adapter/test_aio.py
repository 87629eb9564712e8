"""The asyncio engine (adapter/aio.py) over a real unix socket, spoken to as an MTA would.

The real-Postfix and Sendmail tests run on this engine too (it is the default); these reach
what an MTA does not: inline checks against worker threads, protocol errors, idle MTAs,
connections lost while a worker holds their stage.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from mailward.adapter import aio
from mailward.adapter import protocol as proto
from mailward.adapter.milter import FLAGS, MailwardMilter, ServeError
from mailward.lab.dns import Nameserver
from tests.adapter.test_milter import Runtime
from tests.conftest import make_config

ZONE = """
bank.example.          TXT "v=spf1 ip4:203.0.113.5 -all"
_dmarc.bank.example.   TXT "v=DMARC1; p=reject"
"""
FINAL = {b"a", b"c", b"r", b"t", b"d", b"y"}
CONNECT = b"client.example\0" + b"4" + struct.pack(">H", 40000) + b"203.0.113.5\0"


class Mta:
    """The MTA's side of one milter connection (closed at the end of the test)."""

    opened: ClassVar[list[socket.socket]] = []

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        Mta.opened.append(self.sock)
        self.sock.settimeout(15)
        self.sock.connect(str(path))

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.sock.sendall(proto.packet(command, data))

    def read(self) -> tuple[bytes, bytes]:
        head = self._exactly(4)
        (length,) = struct.unpack(">I", head)
        body = self._exactly(length)
        return body[:1], body[1:]

    def answer(self) -> list[tuple[bytes, bytes]]:
        """Packets up to and including the next final reply."""
        out = [self.read()]
        while out[-1][0] not in FINAL:
            out.append(self.read())
        return out

    def closed(self, wait: float = 5) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the milter closed the connection")
            data += chunk
        return data

    def negotiate(self) -> tuple[int, int, int]:
        self.send(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
        command, data = self.read()
        assert command == b"O"
        return struct.unpack(">III", data)

    def message(self, author: str, *, client: str = "203.0.113.5", quit_: bool = True
                ) -> list[tuple[bytes, bytes]]:
        """One SMTP session of one message; the packets of the final answer."""
        self.negotiate()
        self.send(b"D", b"C{daemon_name}\0smtpd\0")
        self.send(b"C", b"client.example\0" + b"4" + struct.pack(">H", 40000)
                  + client.encode() + b"\0")
        self.send(b"H", b"client.example\0")
        self.send(b"D", b"Mi\0ABC123\0")
        self.send(b"M", f"<ceo@{author}>\0".encode())
        assert self.answer() == [(b"c", b"")]
        self.send(b"R", b"<bob@example.net>\0")
        assert self.answer() == [(b"c", b"")]
        for name, value in (("From", f" ceo@{author}"), ("To", " bob@example.net"),
                            ("Subject", " hi")):
            self.send(b"L", name.encode() + b"\0" + value.encode() + b"\0")
        self.send(b"B", b"Hello.\r\n")
        self.send(b"E")
        answer = self.answer()
        if quit_:
            self.send(b"Q")
        return answer


@pytest.fixture(autouse=True)
def _close_mtas() -> Iterator[None]:
    yield
    while Mta.opened:
        Mta.opened.pop().close()


@pytest.fixture
def runtime(nameserver: Nameserver) -> Runtime:
    nameserver.load_zone(ZONE)
    return Runtime(make_config(
        f"[milter]\nauthserv_id = mx.example.com\n"
        f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
        f"[policy]\nchecks = spf, dkim, dmarc, authres\n"))


@pytest.fixture
def served(runtime: Runtime, tmp_path: Path) -> Iterator[tuple[aio.Engine, Path]]:
    yield from _serve(runtime, tmp_path, timeout=60)


def _serve(runtime: Runtime, tmp_path: Path, *, timeout: float
           ) -> Iterator[tuple[aio.Engine, Path]]:
    path = tmp_path / "milter.sock"
    engine = aio.Engine(runtime, socket=f"unix:{path}", timeout=timeout)
    ready = threading.Event()
    thread = threading.Thread(target=engine.serve, kwargs={"on_ready": ready.set})
    thread.start()
    assert ready.wait(10)
    try:
        yield engine, path
    finally:
        engine.stop()
        thread.join(10)
        assert not thread.is_alive()


def until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_negotiation_asks_what_pymilter_would(served: tuple[aio.Engine, Path]) -> None:
    _, path = served
    version, actions, steps = Mta(path).negotiate()
    assert (version, actions) == (6, FLAGS)
    assert steps == 0x1FFFFF & ~MailwardMilter.protocol_mask()
    assert steps & proto.HDR_LEADSPC and steps & proto.NOREPLY_BIT[b"L"]


def test_a_cold_cache_sends_the_stage_to_a_worker_and_a_warm_one_stays_inline(
        served: tuple[aio.Engine, Path], runtime: Runtime, nameserver: Nameserver) -> None:
    engine, path = served
    answer = Mta(path).message("bank.example")
    assert answer[-1] == (b"a", b"")
    added = [data for command, data in answer if command == b"i"]
    assert len(added) == 1 and b"dmarc=pass" in added[0] and b"mx.example.com" in added[0]
    waited, asked = engine.waited, len(nameserver.queries)
    assert waited >= 1 and asked >= 2
    # the same mail again: every answer cached, every stage inline, nothing asked
    assert Mta(path).message("bank.example")[-1] == (b"a", b"")
    assert (engine.waited, len(nameserver.queries)) == (waited, asked)
    until(lambda: runtime.metrics.connections_active._value.get() == 0)
    assert runtime.drain.open == 0


def test_a_refusal_is_a_reply_code(served: tuple[aio.Engine, Path],
                                   nameserver: Nameserver) -> None:
    nameserver.load_zone('spoof.example. TXT "v=spf1 -all"\n'
                         '_dmarc.spoof.example. TXT "v=DMARC1; p=reject"\n')
    _, path = served
    answer = Mta(path).message("spoof.example")
    assert answer[-1][0] == b"y"
    assert answer[-1][1].startswith(b"550 5.7.1 Rejected by the DMARC policy")


def test_the_mta_may_keep_the_connection_for_its_next_session(
        served: tuple[aio.Engine, Path], runtime: Runtime) -> None:
    _, path = served
    mta = Mta(path)
    assert mta.message("bank.example", quit_=False)[-1] == (b"a", b"")
    mta.send(b"K")  # QUIT_NC: a new SMTP session follows on this connection
    assert mta.message("bank.example")[-1] == (b"a", b"")
    assert mta.closed()
    until(lambda: runtime.metrics.connections_active._value.get() == 0)


@pytest.mark.parametrize("stream", [
    proto.packet(b"M", b"<a@b>\0"),  # before the option negotiation
    struct.pack(">I", proto.MAX_PACKET + 1) + b"B",  # too large
    struct.pack(">I", 0),  # no command
    proto.packet(b"O", b"\0\0\0\x06"),  # a short negotiation
])
def test_a_protocol_error_closes_that_connection_only(
        served: tuple[aio.Engine, Path], runtime: Runtime, stream: bytes) -> None:
    _, path = served
    errors = runtime.metrics.errors.labels(stage="protocol")._value.get()
    bad = Mta(path)
    bad.sock.sendall(stream)
    assert bad.closed()
    assert runtime.metrics.errors.labels(stage="protocol")._value.get() == errors + 1
    assert Mta(path).message("bank.example")[-1] == (b"a", b"")  # the others go on


def test_garbage_after_negotiation_closes_the_connection(
        served: tuple[aio.Engine, Path], runtime: Runtime) -> None:
    _, path = served
    for command, data in ((b"C", b"host"), (b"L", b"Subject"), (b"M", b"no-nul"),
                          (b"Z", b"")):
        mta = Mta(path)
        mta.negotiate()
        mta.send(command, data)
        assert mta.closed(), command
    until(lambda: runtime.metrics.connections_active._value.get() == 0)


def test_an_mta_offering_too_few_actions_is_refused(served: tuple[aio.Engine, Path]) -> None:
    _, path = served
    mta = Mta(path)
    mta.send(b"O", struct.pack(">III", 6, 0x01, 0x1FFFFF))  # may add headers, nothing else
    assert mta.closed()


def test_an_mta_silent_for_longer_than_the_timeout_is_kept(runtime: Runtime,
                                                            tmp_path: Path) -> None:
    """Postfix sends the milter nothing while its client sends DATA, however long that takes
    (cleanup passes the header on once the message is in): silence is no reason to drop it."""
    for _engine, path in _serve(runtime, tmp_path, timeout=0.3):
        mta = Mta(path)
        mta.negotiate()
        assert not mta.closed(wait=1)  # idle, before CONNECT
        mta.send(b"C", CONNECT)
        mta.send(b"M", b"<ceo@bank.example>\0")
        assert mta.answer() == [(b"c", b"")]
        mta.send(b"R", b"<bob@example.net>\0")
        assert mta.answer() == [(b"c", b"")]
        assert not mta.closed(wait=1)  # the client's DATA
        mta.send(b"L", b"From\0 ceo@bank.example\0")
        mta.send(b"E")
        assert mta.answer()[-1] == (b"a", b"")


def test_a_connection_lost_while_a_worker_has_its_stage_ends_cleanly(
        served: tuple[aio.Engine, Path], runtime: Runtime, nameserver: Nameserver) -> None:
    engine, path = served
    nameserver.delay = 0.5
    mta = Mta(path)
    mta.negotiate()
    mta.send(b"C", b"client.example\0" + b"4" + struct.pack(">H", 40000)
             + b"203.0.113.5\0")
    mta.send(b"M", b"<ceo@bank.example>\0")
    mta.send(b"R", b"<bob@example.net>\0")
    for name, value in ((b"From", b" ceo@bank.example"), (b"Subject", b" hi")):
        mta.send(b"L", name + b"\0" + value + b"\0")
    mta.send(b"E")
    until(lambda: engine.waited >= 1)  # end of message waits for DNS in a worker
    mta.sock.close()
    until(lambda: runtime.metrics.connections_active._value.get() == 0)
    assert runtime.drain.open == 0


def test_the_socket_is_restricted_and_removed_at_stop(runtime: Runtime,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    path.touch()
    with pytest.raises(ServeError, match="not a socket"):
        aio.Engine(runtime, socket=f"unix:{path}", timeout=5).serve()
    path.unlink()
    for _engine, served_path in _serve(runtime, tmp_path, timeout=5):
        mode = stat.S_IMODE(os.stat(served_path).st_mode)
        assert mode == 0o660
    assert not path.exists()


def test_stop_ends_serve_with_connections_open(runtime: Runtime, tmp_path: Path) -> None:
    for engine, path in _serve(runtime, tmp_path, timeout=60):
        mta = Mta(path)
        mta.negotiate()
        engine.stop()
        assert mta.closed()


def test_packets_longer_than_one_read_arrive_whole(served: tuple[aio.Engine, Path]) -> None:
    """A 300 KiB header field spans several reads of the loop's 64 KiB buffer."""
    _, path = served
    mta = Mta(path)
    mta.negotiate()
    mta.send(b"C", b"client.example\0" + b"4" + struct.pack(">H", 40000) + b"203.0.113.5\0")
    mta.send(b"M", b"<ceo@bank.example>\0")
    assert mta.answer() == [(b"c", b"")]
    mta.send(b"R", b"<bob@example.net>\0")
    assert mta.answer() == [(b"c", b"")]
    long = b" " + b"x" * (300 * 1024)
    mta.send(b"L", b"X-Long\0" + long + b"\0")
    mta.send(b"L", b"From\0 ceo@bank.example\0")
    mta.send(b"E")
    answer = mta.answer()
    assert answer[-1] == (b"a", b"")
    assert any(command == b"i" and b"dmarc=pass" in data for command, data in answer)


def test_an_mta_that_reads_no_replies_gets_no_more_read(served: tuple[aio.Engine, Path]
                                                        ) -> None:
    """Replies the MTA does not read must not pile up in memory: once the socket's buffer is
    full, the engine reads nothing more from that MTA until it reads its replies."""
    engine, path = served
    mta = Mta(path)
    mta.negotiate()
    mta.sock.setblocking(False)
    chunk = proto.packet(b"T") * 20000  # DATA, a step we asked to skip: each answered `c`
    sent, stalled = 0, time.monotonic()
    while sent < 40 * len(chunk) and time.monotonic() - stalled < 1:
        try:
            sent += mta.sock.send(chunk[sent % len(chunk):])
            stalled = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    (conn,) = engine.connections
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 1024 * 1024, sent
    mta.sock.settimeout(15)
    size = len(proto.packet(b"T"))
    for _ in range(sent // size):  # every command answered, in order
        assert mta.read() == (b"c", b"")
    if sent % size:  # the rest of a packet sent in part
        mta.sock.sendall(proto.packet(b"T")[sent % size:])
        assert mta.read() == (b"c", b"")
    mta.send(b"Q")
    assert mta.closed()


def test_an_idle_mta_that_reads_no_replies_is_disconnected(runtime: Runtime,
                                                           tmp_path: Path) -> None:
    for engine, path in _serve(runtime, tmp_path, timeout=0.3):
        mta = Mta(path)
        mta.negotiate()
        mta.send(b"C", b"client.example\0" + b"4" + struct.pack(">H", 40000)
                 + b"203.0.113.5\0")
        mta.sock.setblocking(False)
        chunk = proto.packet(b"T") * 20000
        sent, stalled = 0, time.monotonic()
        while time.monotonic() - stalled < 0.2:  # until the engine reads no more
            try:
                sent += mta.sock.send(chunk[sent % len(chunk):])
                stalled = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        until(lambda e=engine: not e.connections)  # not held open by the unread replies
        assert runtime.metrics.connections_active._value.get() == 0


def test_stop_after_serve_has_returned_is_harmless(runtime: Runtime, tmp_path: Path) -> None:
    for engine, _path in _serve(runtime, tmp_path, timeout=60):
        engine.stop()
        until(lambda e=engine: e.loop.is_closed())
        engine.stop()  # e.g. app.py's stop racing an engine that has already ended


def test_a_stage_still_queued_for_a_worker_is_dropped_when_its_mta_goes(
        runtime: Runtime, nameserver: Nameserver, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An MTA that gave up waiting (its milter timeout) is gone: its stage must not take a
    worker from those still waiting (with every worker busy, the queue would only grow)."""
    monkeypatch.setattr(aio, "WAIT_THREADS", 1)
    nameserver.delay = 0.3
    for engine, path in _serve(runtime, tmp_path, timeout=60):
        first, gone = Mta(path), Mta(path)
        for mta, author in ((first, b"first.example"), (gone, b"gone.example")):
            mta.negotiate()
            mta.send(b"C", b"client.example\0" + b"4" + struct.pack(">H", 40000)
                     + b"203.0.113.5\0")
            mta.send(b"M", b"<ceo@" + author + b">\0")
            assert mta.answer() == [(b"c", b"")]
            mta.send(b"L", b"From\0 ceo@" + author + b"\0")
            mta.send(b"E")
            until(lambda e=engine, n=1 + (mta is gone): e.waited >= n)
        gone.sock.close()  # while its end of message waits for the one worker
        assert first.answer()[-1] == (b"a", b"")
        until(lambda: runtime.metrics.connections_active._value.get() == 1)
        assert runtime.drain.open == 0
        assert not [q for q in nameserver.queries if "gone.example" in q[0]]



def _open_transaction(mta: Mta) -> None:
    mta.negotiate()
    mta.send(b"C", CONNECT)
    mta.send(b"M", b"<ceo@bank.example>\0")
    assert mta.answer() == [(b"c", b"")]
    mta.send(b"R", b"<bob@example.net>\0")
    assert mta.answer() == [(b"c", b"")]


def test_connections_read_in_interleaved_pieces_keep_their_own_bytes(
        served: tuple[aio.Engine, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection reads into the engine's one buffer: six MTAs sending packets larger
    than it, cut anywhere (inside the length, between packets) and interleaved, each get
    exactly their own header fields."""
    seen: dict[int, list[tuple[str, str]]] = {}
    header = MailwardMilter.header

    def recording(milter: MailwardMilter, name: str, value: str) -> int:
        seen.setdefault(id(milter), []).append((name, value))
        return header(milter, name, value)

    monkeypatch.setattr(MailwardMilter, "header", recording)
    _, path = served
    streams = []
    for n in range(6):
        mta = Mta(path)
        _open_transaction(mta)
        fields = [(f"X-{k}", chr(ord("A") + n) * (50_000 + 7 * k)) for k in range(4)]
        data = b"".join(proto.packet(b"L", f"{name}\0{value}\0".encode())
                        for name, value in fields)
        data += proto.packet(b"L", b"From\0 ceo@bank.example\0") + proto.packet(b"E")
        streams.append((mta, data, [*fields, ("From", " ceo@bank.example")]))
    sizes = [1, 3, 4, 5, 999, 65536, 70000]
    sent = [0] * len(streams)
    step = 0
    while any(done < len(data) for done, (_, data, _) in zip(sent, streams, strict=True)):
        n = step % len(streams)
        mta, data, _ = streams[n]
        size = sizes[(step // len(streams)) % len(sizes)]
        mta.sock.sendall(data[sent[n]:sent[n] + size])
        sent[n] += size
        step += 1
    for mta, _, _ in streams:
        assert mta.answer()[-1] == (b"a", b"")
    assert sorted(seen.values()) == sorted(fields for _, _, fields in streams)


@pytest.fixture
def few_fields(nameserver: Nameserver, tmp_path: Path
               ) -> Iterator[tuple[Runtime, aio.Engine, Path]]:
    nameserver.load_zone(ZONE)
    runtime = Runtime(make_config(
        f"[milter]\nauthserv_id = mx.example.com\nmax_header_fields = 100\n"
        f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
        f"[policy]\nchecks = spf, dkim, dmarc, authres\n"))
    for engine, path in _serve(runtime, tmp_path, timeout=60):
        yield runtime, engine, path


def test_too_many_header_fields_refuse_only_that_message(
        few_fields: tuple[Runtime, aio.Engine, Path]) -> None:
    """Past [milter] max_header_fields: 552 at end of message, the body not kept, the
    transaction closed; an abort or the MTA's next session (QUIT_NC) clears the count."""
    runtime, _, path = few_fields
    mta = Mta(path)
    _open_transaction(mta)
    for i in range(101):
        mta.send(b"L", b"X-F%d\0 v\0" % i)
    mta.send(b"B", b"x" * 60000)
    mta.send(b"E", b"y" * 100)
    assert mta.answer() == [(b"y", b"552 5.3.4 Message header has too many fields\0")]
    assert runtime.drain.open == 0
    refused = runtime.metrics.messages.labels(direction="inbound", verdict="reject")
    assert refused._value.get() == 1
    mta.send(b"M", b"<ceo@bank.example>\0")  # too many again, then aborted
    assert mta.answer() == [(b"c", b"")]
    for i in range(101):
        mta.send(b"L", b"X-F%d\0 v\0" % i)
    mta.send(b"A")
    mta.send(b"M", b"<ceo@bank.example>\0")  # a message of a few fields goes through
    assert mta.answer() == [(b"c", b"")]
    mta.send(b"R", b"<bob@example.net>\0")
    assert mta.answer() == [(b"c", b"")]
    for i in range(99):
        mta.send(b"L", b"X-F%d\0 v\0" % i)
    mta.send(b"L", b"From\0 ceo@bank.example\0")
    mta.send(b"E")
    assert mta.answer()[-1] == (b"a", b"")
    mta.send(b"M", b"<ceo@bank.example>\0")  # too many, then the MTA's next session
    assert mta.answer() == [(b"c", b"")]
    for i in range(101):
        mta.send(b"L", b"X-F%d\0 v\0" % i)
    assert runtime.drain.open == 1
    mta.send(b"K")
    assert mta.message("bank.example")[-1] == (b"a", b"")
    assert mta.closed()
    until(lambda: runtime.metrics.connections_active._value.get() == 0)
    assert runtime.drain.open == 0
    assert refused._value.get() == 1


def test_a_stage_a_worker_has_for_longer_than_the_timeout_is_answered(
        runtime: Runtime, nameserver: Nameserver, tmp_path: Path) -> None:
    nameserver.delay = 0.4
    for engine, path in _serve(runtime, tmp_path, timeout=0.2):
        mta = Mta(path)
        _open_transaction(mta)
        mta.send(b"L", b"From\0 ceo@bank.example\0")
        mta.send(b"E")
        start = time.monotonic()
        assert mta.answer()[-1] == (b"a", b"")  # its DNS took longer than the timeout
        assert engine.waited >= 1 and time.monotonic() - start > 0.3
