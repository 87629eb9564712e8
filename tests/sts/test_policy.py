"""RFC 8461's records and policies, MX patterns and Postfix answers: the pure part."""

from __future__ import annotations

import pytest

from mailward.sts import netstring
from mailward.sts.policy import (
    MAX_AGE_LIMIT,
    Mode,
    Policy,
    PolicyError,
    lookup_domain,
    mx_matches,
    parse_policy,
    parse_txt,
    postfix_answer,
)

GOOD = ("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
        "max_age: 86400\r\n")


def test_a_policy_parses() -> None:
    assert parse_policy(GOOD) == Policy(Mode.ENFORCE, 86400, ("mail.example.com", "*.example.net"))


def test_lf_endings_extensions_case_and_duplicates() -> None:
    text = "version: STSv1\nmode: testing\nmx: MAIL.Example.com\nmx: mail.example.com\n" \
           "ext_field: any value, with spaces\nmax_age:604800"
    assert parse_policy(text) == Policy(Mode.TESTING, 604800, ("mail.example.com",))


def test_none_needs_no_mx_and_max_age_is_capped() -> None:
    p = parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n")
    assert p == Policy(Mode.NONE, MAX_AGE_LIMIT, ())


@pytest.mark.parametrize(("text", "why"), [
    ("", "no version"),
    ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version is not STSv1"),
    ("version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    ("version: STSv1\nmode: enforce\nmx: a.example\n", "no max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: \uff11\uff12\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n", "twice"),
    ("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "host name pattern"),
    ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n", "host name pattern"),
    ("version: STSv1\nmode: enforce\nmx: 192.0.2.1 x\nmax_age: 1\n", "host name pattern"),
    ("version: STSv1\nmode: enforce\nmx: example\nmax_age: 1\n", "host name pattern"),
    ("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 1\n", "line 2"),
    ("version: STSv1\nmode: enforce\n\nmx: a.example\nmax_age: 1\n", "line 3"),
    ("version: STSv1\x00\nmode: enforce\nmx: a.example\nmax_age: 1\n", "line 1"),
    ("<html>\n<body>hello</body>\n", "line 1"),
])
def test_bad_policies_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


def test_too_many_patterns_or_lines() -> None:
    many = "".join(f"mx: m{i}.example.com\n" for i in range(65))
    with pytest.raises(PolicyError, match="mx patterns"):
        parse_policy("version: STSv1\nmode: enforce\nmax_age: 1\n" + many)
    with pytest.raises(PolicyError, match="lines"):
        parse_policy("version: STSv1\n" + "x: y\n" * 600)


@pytest.mark.parametrize(("records", "expected"), [
    ((b"v=STSv1; id=20160831085700Z;",), "20160831085700Z"),
    ((b"v=STSv1;id=abc",), "abc"),
    ((b"v=STSv1; id=abc; ext=foo",), "abc"),
    ((b"v=spf1 -all", b"v=STSv1; id=abc;"), "abc"),
    ((b"v=STSv1; id=abc;", b"v=STSv1; id=def;"), None),  # two: none usable
    ((b"v=STSv1;",), None),  # no id
    ((b"v=STSv1; id=;",), None),
    ((b"v=STSv1; id=" + b"a" * 33,), None),
    ((b"v=STSv1; id=a-b",), None),
    ((b"v=STSv1; id=a; id=b",), None),
    ((b"v=STSv10; id=a",), None),
    ((b"id=a; v=STSv1",), None),
    ((b"v=STSv1; id=a; bad",), None),
    ((b"v=STSv1; id=\xff",), None),
    ((), None),
])
def test_txt_records(records: tuple[bytes, ...], expected: str | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.example.com.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "a.b.example.com", False),  # one label only (RFC 8461 §4.1)
    ("*.example.com", "example.com", False),
    ("*.example.com", ".example.com", False),
])
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_postfix_answers() -> None:
    assert postfix_answer(parse_policy(GOOD)) == \
        "secure match=mail.example.com:.example.net servername=hostname"
    testing = Policy(Mode.TESTING, 1, ("a.example",))
    assert postfix_answer(testing) is None
    assert postfix_answer(Policy(Mode.NONE, 1, ())) is None


@pytest.mark.parametrize(("key", "domain"), [
    ("example.com", "example.com"),
    ("Example.COM.", "example.com"),
    (".example.com", None),  # a parent-domain probe
    ("[mx.example.com]:25", None),
    ("[192.0.2.1]", None),
    ("192.0.2.1", None),
    ("com", None),
    ("exa mple.com", None),
    ("a" * 64 + ".com", None),
    ("", None),
])
def test_lookup_keys(key: str, domain: str | None) -> None:
    assert lookup_domain(key) == domain


def test_netstrings() -> None:
    assert netstring.encode(b"postfix example.com") == b"19:postfix example.com,"
    assert netstring.decode(b"3:abc,4:de", 100) == (b"abc", b"4:de")
    assert netstring.decode(b"4:de", 100) is None
    assert netstring.decode(b"", 100) is None
    assert netstring.decode(b"12", 100) is None
    assert netstring.decode(b"0:,", 100) == (b"", b"")
    for bad in (b"x:abc,", b"3:abcd", b"01:a,", b"1000:", b"99999", b"-1:a,", b":a,"):
        with pytest.raises(netstring.NetstringError):
            netstring.decode(bad, 100)
