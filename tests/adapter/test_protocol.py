"""The milter protocol codec (adapter/protocol.py): frames split and bounded, fields checked."""

from __future__ import annotations

import struct
import time
import tracemalloc

import pytest

from mailward.adapter import protocol as proto


def frame(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def test_packets_are_split_wherever_the_stream_breaks() -> None:
    stream = frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)) + frame(b"B", b"x" * 70) \
        + frame(b"Q")
    for cut in range(len(stream) + 1):
        reader = proto.Reader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [c for c, _ in got] == [b"O", b"B", b"Q"]
        assert got[1][1] == b"x" * 70 and reader.pending == 0


def test_a_packet_over_the_limit_is_refused_before_it_is_read() -> None:
    reader = proto.Reader(limit=100)
    assert reader.feed(frame(b"B", b"x" * 99)) == [(b"B", b"x" * 99)]
    with pytest.raises(proto.ProtocolError, match="101 bytes"):
        reader.feed(struct.pack(">I", 101) + b"B")  # only the length has arrived
    with pytest.raises(proto.ProtocolError, match="without a command"):
        proto.Reader().feed(struct.pack(">I", 0))
    assert proto.Reader().feed(struct.pack(">I", proto.MAX_PACKET))  == []  # waits for it


def test_option_negotiation() -> None:
    assert proto.options(struct.pack(">III", 6, 0x1FF, 0x1FFFFF)) == proto.Options(
        6, 0x1FF, 0x1FFFFF)
    for bad in (b"", struct.pack(">II", 6, 1), struct.pack(">III", 1, 0x1FF, 0)):
        with pytest.raises(proto.ProtocolError):
            proto.options(bad)
    assert proto.negotiate(6, 0x31, 0x1837C0) == frame(b"O", struct.pack(">III", 6, 0x31,
                                                                          0x1837C0))


def test_macros_strings_headers_and_connect() -> None:
    assert proto.macros(b"Mi\0ABC\0{auth_authen}\0alice\0") == (
        b"M", {"i": "ABC", "{auth_authen}": "alice"})
    assert proto.macros(b"C") == (b"C", {})
    assert proto.macros(b"Mi\0ABC\0odd\0") == (b"M", {"i": "ABC"})  # an odd name is dropped
    with pytest.raises(proto.ProtocolError):
        proto.macros(b"")
    with pytest.raises(proto.ProtocolError, match="NUL"):
        proto.macros(b"Mi\0ABC")
    assert proto.strings(b"<a@b>\0SIZE=10\0") == ["<a@b>", "SIZE=10"]
    assert proto.strings(b"\xff\0") == ["\udcff"]  # as pymilter: surrogate escapes
    assert proto.header(b"Subject\0 hi\0") == ("Subject", " hi")
    assert proto.header(b"X-Empty\0\0") == ("X-Empty", "")
    for bad in (b"Subject\0", b"Subject\0 a\0b\0", b"Subject"):
        with pytest.raises(proto.ProtocolError):
            proto.header(bad)
    v4 = proto.connect(b"mx.example\0" + b"4" + struct.pack(">H", 2525) + b"192.0.2.1\0")
    assert v4 == proto.Connect("mx.example", "4", ("192.0.2.1", 2525))
    v6 = proto.connect(b"[2001:db8::1]\0" + b"6" + struct.pack(">H", 25) + b"2001:db8::1\0")
    assert v6.hostaddr == ("2001:db8::1", 25)
    assert proto.connect(b"localhost\0L/run/x.sock\0").hostaddr == "/run/x.sock"
    assert proto.connect(b"unknown\0U").hostaddr is None
    for bad in (b"", b"host", b"host\0", b"host\x004\0", b"host\x004" + b"\0\x19a"):
        with pytest.raises(proto.ProtocolError):
            proto.connect(bad)


def test_replies_are_checked_as_libmilter_checks_them() -> None:
    assert proto.reply("550", "5.7.1", "Rejected: 100%% spam") == frame(
        b"y", b"550 5.7.1 Rejected: 100%% spam\0")
    assert proto.reply("421", None, None) == frame(b"y", b"421\0")
    for code, xcode, text in (("250", "2.0.0", "ok"), ("55", "5.7.1", "x"),
                              ("5x0", "5.7.1", "x"), ("550", "5.7", "x"),
                              ("550", "6.7.1", "x"), ("550", "5.7.1234", "x"),
                              ("550", "5.7.1", "a\r\nRCPT TO:<victim@example.com>"),
                              ("550", "5.7.1", "a\nb"), ("550", "5.7.1", "x" * 981),
                              ("550", "5.7.1", "nul\0")):
        with pytest.raises(ValueError):
            proto.reply(code, xcode, text)


def test_header_edits() -> None:
    assert proto.add_header("X-A", " b") == frame(b"h", b"X-A\0 b\0")
    assert proto.add_header("X-A", " b", 0) == frame(b"i", b"\0\0\0\0X-A\0 b\0")
    assert proto.change_header("X-A", 2, "") == frame(b"m", b"\0\0\0\x02X-A\0\0")
    assert proto.quarantine("why") == frame(b"q", b"why\0")
    assert proto.add_header("X-\udcff", " \udcfe") == frame(b"h", b"X-\xff\0 \xfe\0")
    with pytest.raises(ValueError, match="NUL"):
        proto.add_header("X-A", "a\0b")


@pytest.mark.parametrize("parse", [proto.macros, proto.macro_block, proto.strings])
def test_a_packet_of_many_short_strings_is_refused_not_expanded(parse: object) -> None:
    """A 1 MiB MACRO or MAIL packet of 3-byte words would be ~350,000 str objects (35 MB,
    kept per macro stage for the connection's life); no MTA sends more than a few dozen."""
    words = [f"{i:x}".encode() for i in range(0x100, 0x100 + 350_000)]
    data = b"M" + b"\0".join(words)[:proto.MAX_PACKET - 2] + b"\0"
    tracemalloc.start()
    try:
        parse(data)  # type: ignore[operator]
    except proto.ProtocolError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * len(data), peak
    assert len(proto.strings(b"ab\0" * proto.MAX_STRINGS)) == proto.MAX_STRINGS


def test_a_packet_that_arrives_a_few_bytes_at_a_time_costs_linear_time() -> None:
    """A peer that writes a 1 MiB packet 2 bytes at a time must not make every read copy
    all that has arrived so far (that took seconds of the event loop's time)."""
    data = frame(b"B", b"x" * (proto.MAX_PACKET - 1))
    reader = proto.Reader()
    got: list[tuple[bytes, bytes]] = []
    start = time.perf_counter()
    for i in range(0, len(data), 2):
        got += reader.feed(data[i:i + 2])
    assert time.perf_counter() - start < 2
    assert got == [(b"B", data[5:])] and reader.pending == 0
