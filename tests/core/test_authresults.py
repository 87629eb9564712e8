"""The Authentication-Results and ARC-Authentication-Results parser: what it reads, what it
refuses, and that hostile values cost linear time (issue 10)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import authres
import pytest

from mailward.checks.authres import render
from mailward.core.authresults import AuthResults, ResInfo, aar_instance, parse, parse_aar
from mailward.core.verdict import AuthResEntry, Result

FUZZ = os.environ.get("MAILWARD_FUZZ", "") not in ("", "0")


def test_a_typical_field() -> None:
    got = parse(" lists.example.org 1;\r\n  arc=none;\r\n  spf=pass smtp.mailfrom=a@d1.example;"
                "\r\n  dkim/1=pass (1024-bit key; good) header.i=@d1.example header.b=\"ab=\";"
                "\r\n  dmarc=pass reason=\"aligned; dkim\" header.from=D1.example")
    assert got == AuthResults("lists.example.org", (
        ResInfo("arc", "none", (), "arc=none"),
        ResInfo("spf", "pass", (("smtp.mailfrom", "a@d1.example"),),
                "spf=pass smtp.mailfrom=a@d1.example"),
        ResInfo("dkim", "pass", (("header.i", "@d1.example"), ("header.b", "ab=")),
                'dkim/1=pass (1024-bit key; good) header.i=@d1.example header.b="ab="'),
        ResInfo("dmarc", "pass", (("header.from", "D1.example"),),
                'dmarc=pass reason="aligned; dkim" header.from=D1.example'),
    ))
    assert got.results[3].get("header.from") == "D1.example"
    assert got.results[3].get("header.d") == ""


@pytest.mark.parametrize(("value", "expected"), [
    ('"quoted \\" id"; none', AuthResults('quoted " id')),
    ("(comment (nested)) mx.example; dkim=pass", AuthResults("mx.example", (
        ResInfo("dkim", "pass", (), "dkim=pass"),))),
    ("mx.example; dkim=pass header.d", AuthResults("mx.example")),  # malformed: left out
    ("mx.example; dkim; spf=fail", AuthResults("mx.example", (
        ResInfo("spf", "fail", (), "spf=fail"),))),
    ("mx.example; dkim=pass nodot=x", AuthResults("mx.example")),
    # a value runs on through what touches it: `=` is atext in a local-part (RFC 5322)
    ("mx.example; spf=pass smtp.mailfrom==@b.example", AuthResults("mx.example", (
        ResInfo("spf", "pass", (("smtp.mailfrom", "=@b.example"),),
                "spf=pass smtp.mailfrom==@b.example"),))),
    ("mx.example; spf=pass smtp.mailfrom= a@b", AuthResults("mx.example", (
        ResInfo("spf", "pass", (("smtp.mailfrom", "a@b"),), "spf=pass smtp.mailfrom= a@b"),))),
    ("mx.example; spf=pass smtp.mailfrom=", AuthResults("mx.example")),
])
def test_what_is_read_and_what_is_left_out(value: str, expected: AuthResults) -> None:
    assert parse(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "; spf=pass", "(unterminated; spf=pass",
                                   'mx "unterminated', "mx; spf=pass )", "mx a b; spf=pass",
                                   "mx; spf=pass \\", "x" * 16385])
def test_unreadable_fields_are_none(value: str) -> None:
    assert parse(value) is None


@pytest.mark.parametrize(("value", "instance"), [
    ("i=1; lists.example; none", 1), (" i = 50 ;x; none", 50), ("\r\n\ti=7;x", 7),
    ("i=100; x", None), ("i=1 x; none", None), ("x; i=1", None), ("I=1; x", None),
    ("i=; x", None), ("i=1", None),
])
def test_the_aar_instance(value: str, instance: int | None) -> None:
    assert aar_instance(value) == instance


def test_an_aar_payload() -> None:
    assert parse_aar("i=2; fwd.example; arc=pass") == (2, AuthResults("fwd.example", (
        ResInfo("arc", "pass", (), "arc=pass"),)))
    assert parse_aar("i=2 fwd.example; arc=pass") is None
    assert parse_aar("i=2; (unterminated") is None
    assert parse_aar("i=2; " + "x" * 16380) is None


def test_what_our_renderer_writes_reads_back() -> None:
    entries = (AuthResEntry("spf", Result.PASS, properties=(("smtp", "mailfrom",
                                                             'we"ird;(x)@b.example'),)),
               AuthResEntry("arc", Result.FAIL, reason="ARC-Seal i=1: (no; key)",
                            comment="i=(2)", properties=(("smtp", "remote-ip", "192.0.2.1"),)),
               AuthResEntry("dmarc", Result.FAIL, reason="p=reject",
                            properties=(("header", "from", "bank.example"),
                                        ("policy", "dmarc", "reject"))))
    got = parse(render("mx.example.com", entries))
    assert got is not None and got.authserv_id == "mx.example.com"
    assert [(r.method, r.result, r.properties) for r in got.results] == [
        ("spf", "pass", (("smtp.mailfrom", 'we"ird;(x)@b.example'),)),
        ("arc", "fail", (("smtp.remote-ip", "192.0.2.1"),)),
        ("dmarc", "fail", (("header.from", "bank.example"), ("policy.dmarc", "reject")))]


def test_the_authres_library_cannot_read_what_we_can() -> None:
    """Why a parser of our own: authres recurses per nested comment."""
    value = "mx.example; spf=pass (" + "(" * 600 + ")" * 601
    with pytest.raises(RecursionError):
        authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert parse(value) == AuthResults("mx.example", (
        ResInfo("spf", "pass", (), value.split("; ", 1)[1]),))


SHAPES: dict[str, Callable[[int], str]] = {
    "nested comments": lambda n: "x; spf=pass " + "(" * (n // 2) + ")" * (n // 2),
    "unterminated comment": lambda n: "x; spf=pass " + "(" * n,
    "escapes": lambda n: 'x; spf=pass reason="' + "\\a" * (n // 2) + '"',
    "unterminated quote": lambda n: 'x; spf=pass reason="' + "a" * n,
    "many results": lambda n: "x" + "; spf=pass smtp.mailfrom=a@b.c" * (n // 30),
    "many properties": lambda n: "x; spf=pass" + " smtp.mailfrom=a@b.c" * (n // 20),
    "semicolons": lambda n: "x" + ";" * n,
    "white space": lambda n: "x;" + " \r\n\t" * (n // 3) + "spf=pass",
    "aar prefix digits": lambda n: "i=" + "1" * n,
    "aar prefix spaces": lambda n: "i" + " " * n + "=1;",
}


def _timed(value: str) -> float:
    start = time.thread_time()  # CPU time: other processes do not count
    parse(value, limit=None)
    parse_aar(value, limit=None)
    return time.thread_time() - start


@pytest.mark.parametrize("shape", list(SHAPES))
def test_hostile_values_cost_linear_time(shape: str) -> None:
    """100 KB costs a small multiple of 10 KB (a quadratic parser gives ~100x), bounds off."""
    make = SHAPES[shape]

    def cost(n: int) -> float:
        gc.disable()
        try:
            return min(_timed(make(n)) for _ in range(3))
        finally:
            gc.enable()

    cost(1000)
    small, large = cost(10_000), cost(100_000)
    assert large < 25 * max(small, 0.001), (small, large)
    if FUZZ:
        assert large < 0.050, f"{shape}: {large * 1000:.1f} ms"
