"""The From field as a reader sees it: one linear parser, the same under every interpreter."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import mailward
from mailward.core.addresses import (
    MAX_AUTHORS,
    MAX_FROM_LENGTH,
    AuthorProblem,
    Malformed,
    parse_authors,
    tokenize,
)
from tests.conftest import need

# (From value, the domains a reader sees, or the problem)
CORPUS: list[tuple[str, tuple[str, ...] | AuthorProblem]] = [
    ("ceo@bank.example", ("bank.example",)),
    # CFWS anywhere between tokens (RFC 5322 §3.2.2, §4.4): the bypass of issue 7
    ("ceo@ bank.example", ("bank.example",)),
    ("ceo@\n bank.example", ("bank.example",)),
    ("ceo@\r\n\tbank.example", ("bank.example",)),
    ("ceo@(comment)bank.example", ("bank.example",)),
    ("ceo@((nested) comment)bank.example", ("bank.example",)),
    ("ceo @ bank.example", ("bank.example",)),
    ("ceo@bank .example", ("bank.example",)),
    ("ceo@bank. example", ("bank.example",)),
    ("Boss <ceo@ bank.example>", ("bank.example",)),
    ("Boss <ceo@(x) bank.example (y)>", ("bank.example",)),
    ("(a) ceo (b) @ (c) bank (d) . (e) example (f)", ("bank.example",)),
    ("boss@ example.net, alice@example.net", ("example.net",)),
    # ordinary forms
    ("Alice <alice@Example.COM.>", ("example.com",)),
    ('"Smith, John" <j@x.example>', ("x.example",)),
    ("Joe Q. Public <john.q.public@example.com>", ("example.com",)),
    ("john@example.com (John Smith)", ("example.com",)),
    ("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", ("silly.test",)),
    ("=?utf-8?q?J=C3=BCrgen?= <j@x.example>", ("x.example",)),
    ("Jürgen <j@bücher.example>", ("xn--bcher-kva.example",)),
    ('"ceo@bank.example" <x@evil.example>', ("evil.example",)),
    ("Group: a@x.example, b@y.example;", ("x.example", "y.example")),
    ("a@x.example, b@x.example", ("x.example",)),
    ("<@r.example,@s.example:u@t.example>", ("t.example",)),
    ('"q\\"x"@z.example', ("z.example",)),
    # no author domain: DMARC does not apply
    ("undisclosed", AuthorProblem.NO_ADDRESS),
    ("Undisclosed recipients:;", AuthorProblem.NO_ADDRESS),
    ("a@[192.0.2.1]", AuthorProblem.NO_ADDRESS),
    # an @ that names no certain domain: malformed
    ("ceo@bank.example <x@evil.example>", AuthorProblem.MALFORMED),
    ('"Boss" <x@evil.example> <y@example.com>', AuthorProblem.MALFORMED),
    ("a@b@c.example", AuthorProblem.MALFORMED),
    ("x <a@b.example", AuthorProblem.MALFORMED),
    ("a@", AuthorProblem.MALFORMED),
    ("@bank.example", AuthorProblem.MALFORMED),
    ("a@bank.example!", AuthorProblem.MALFORMED),
    ("a@-bad.example", AuthorProblem.MALFORMED),
    ("a@bank..example", AuthorProblem.MALFORMED),
    ("a@" + "x" * 64 + ".example", AuthorProblem.MALFORMED),
    ("a@bank.example)", AuthorProblem.MALFORMED),
    ("(unterminated a@bank.example", AuthorProblem.MALFORMED),
    ('"unterminated a@bank.example', AuthorProblem.MALFORMED),
    ("a@bank.example\\", AuthorProblem.MALFORMED),
    ("x <>", AuthorProblem.MALFORMED),
    ("(" * 100 + "a@b.example", AuthorProblem.MALFORMED),
    (", ".join(f"a{i}@x.example" for i in range(MAX_AUTHORS + 1)), AuthorProblem.MALFORMED),
    ("a@b.example " + "(c)" * MAX_FROM_LENGTH, AuthorProblem.MALFORMED),
]


def outcome(value: str) -> tuple[str, ...] | AuthorProblem:
    found = parse_authors([value])
    return found.problem if found.problem is not None else found.domains


@pytest.mark.parametrize(("value", "expected"), CORPUS)
def test_the_author_domain_is_what_a_reader_sees(value: str,
                                                 expected: tuple[str, ...] | AuthorProblem
                                                 ) -> None:
    assert outcome(value) == expected


def test_no_field_and_several_fields() -> None:
    assert parse_authors([]).problem is AuthorProblem.NO_FIELD
    assert parse_authors(["a@x.example", "a@x.example"]).problem is \
        AuthorProblem.MULTIPLE_FIELDS


def test_local_parts_are_kept_as_written() -> None:
    assert parse_authors(['Boss <"b oss"@X.example>']).addresses == (('"b oss"', "x.example"),)


@pytest.mark.parametrize("shape", ["(" * 50_000 + ")" * 50_000, '"' + "\\x" * 50_000 + '"',
                                   "a" * 100_000, "(a)" * 33_000, " \r\n" * 33_000,
                                   "a@" * 50_000, "<" * 100_000, "[" + "x" * 100_000])
def test_the_tokenizer_is_linear(shape: str) -> None:
    """The cost of 100 KB is a small multiple of the cost of 10 KB (a quadratic parser would
    give ~100x; the standard library's header parser takes tens of seconds on such input).
    Garbage collection, triggered by the many small tokens, is kept out of the measure."""

    def cost(text: str) -> float:
        gc.disable()
        try:
            return min(_timed(text) for _ in range(3))
        finally:
            gc.enable()

    small = cost(shape[:len(shape) // 10])
    assert cost(shape) < 40 * max(small, 1e-4)


def _timed(text: str) -> float:
    start = time.thread_time()  # CPU time: other processes do not count
    try:
        tokenize(text)
    except Malformed:
        pass
    return time.thread_time() - start


def test_the_caps_come_before_parsing() -> None:
    start = time.thread_time()
    assert outcome("(" * 100_000) is AuthorProblem.MALFORMED
    assert outcome("a@b.example, " * 5000) is AuthorProblem.MALFORMED
    assert time.thread_time() - start < 1  # generous: each is a length check


DEBIAN_PYTHON = "/usr/bin/python3"


def test_the_same_answers_under_debians_python() -> None:
    """The parser uses no standard-library email code, so Debian's patched 3.11.2 (whose
    email.utils is stricter than upstream 3.11.7's) reads every field the same way."""
    need(shutil.which(DEBIAN_PYTHON) is not None, "Debian's python3 is missing")
    source = str(Path(mailward.__file__).parents[1])
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]);"
              "from mailward.core.addresses import parse_authors;"
              "values = json.load(sys.stdin);"
              "out = [];\n"
              "for v in values:\n"
              "    a = parse_authors([v])\n"
              "    out.append(str(a.problem) if a.problem else list(a.domains))\n"
              "json.dump([sys.version_info[:3], out], sys.stdout)")
    values = [v for v, _ in CORPUS]
    proc = subprocess.run([DEBIAN_PYTHON, "-c", script, source], input=json.dumps(values),
                          capture_output=True, text=True, check=True)
    version, theirs = json.loads(proc.stdout)
    ours = [str(e) if isinstance(e, AuthorProblem) else list(e)
            for e in (outcome(v) for v in values)]
    assert theirs == ours, version
