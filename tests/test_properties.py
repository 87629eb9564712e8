"""Property tests for every parser and state machine mailward owns (issue 7's fuzz harness).

Each property holds for any input: a defined result, never an exception, and (under
`make fuzz`, MAILWARD_FUZZ=1) never more than 50 ms per input. Inputs a run ever found wrong
are pinned with @example.
"""

from __future__ import annotations

import asyncio
import configparser
import functools
import gzip
import hashlib
import json
import re
import struct
import tempfile
from typing import Any

import dkim as dkimpy
import Milter
from dkim import crypto as dkim_crypto
from hypothesis import example, given
from hypothesis import strategies as st

from mailward import audit
from mailward.adapter import aio
from mailward.adapter import protocol as proto
from mailward.checks import arc, authres
from mailward.checks.dmarc import parse_record
from mailward.checks.trace import Settings as TraceSettings
from mailward.checks.trace import _sanitise
from mailward.core import arcsets, authresults
from mailward.core.addresses import AuthorProblem, normalise_domain, parse_authors, tokenize
from mailward.core.bodyhash import BodyHash
from mailward.core.check import Context
from mailward.core.nets import PRIVATE_NETWORKS, in_networks, parse_ip
from mailward.core.transaction import Header, index_headers
from mailward.core.verdict import AuthResEntry, Result
from mailward.errors import ConfigError
from mailward.reports.aggregate import ReportError
from mailward.reports.aggregate import parse as parse_report
from mailward.reports.unpack import attachments, xml_of
from mailward.services import dkimcrypto, keys
from mailward.services.dns import Budget
from mailward.services.metrics import STS_FETCHES
from mailward.sts import netstring
from mailward.sts.cache import CacheError, Entry
from mailward.sts.fetch import FetchError, _parse_response
from mailward.sts.policy import Mode as StsMode
from mailward.sts.policy import PolicyError, parse_policy, parse_txt, postfix_answer
from tests.adapter.test_milter import session
from tests.conftest import loads, make_config, snapshot_of

# text with the characters that matter to these grammars over-represented
GRAMMAR = st.text(alphabet=st.sampled_from([*'ab.@<>,;:()[]"\\ \t\r\n=é-_1', "\x00"]),
                  max_size=300)
ANY_TEXT = st.one_of(GRAMMAR, st.text(max_size=300))
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=2, max_size=4).map(".".join)
LOCAL = st.from_regex(r"[a-z0-9]+(\.[a-z0-9]+){0,2}", fullmatch=True)
CFWS = st.sampled_from(["", " ", "\n ", "\r\n\t", "(c)", " (a (b) c) ", "(\\))"])


@given(ANY_TEXT)
@example("ceo@ bank.example")
@example("(" * 60 + "a@b.example")
def test_any_from_field_gets_a_defined_answer(value: str) -> None:
    found = parse_authors([value])
    assert found.problem is None or isinstance(found.problem, AuthorProblem)
    for domain in found.domains:
        assert normalise_domain(domain) == domain


@given(LOCAL, DOMAIN, st.lists(CFWS, min_size=6, max_size=6), st.booleans())
def test_cfws_anywhere_never_changes_the_author_domain(local: str, domain: str,
                                                       gaps: list[str], angle: bool) -> None:
    """What a reader sees: comments and folds between tokens change nothing (RFC 5322 §3.2.2)."""
    first, rest = domain.split(".", 1)
    spec = f"{local}{gaps[0]}@{gaps[1]}{first}{gaps[2]}.{gaps[3]}{rest}"
    value = f"{gaps[4]}Name <{spec}>{gaps[5]}" if angle else f"{gaps[4]}{spec}{gaps[5]}"
    assert parse_authors([value]).domains == (domain,)


@given(ANY_TEXT)
def test_the_tokenizer_answers_or_says_malformed(value: str) -> None:
    try:
        tokens = tokenize(value)
    except ValueError:
        return
    assert all(isinstance(text, str) for _, text in tokens)


@given(st.one_of(ANY_TEXT, st.builds(
    lambda tags: "v=DMARC1; " + "; ".join(f"{k}={v}" for k, v in tags),
    st.lists(st.tuples(st.sampled_from(["p", "sp", "np", "adkim", "aspf", "t", "psd", "pct",
                                        "rua", "x"]), GRAMMAR), max_size=8))))
def test_any_dmarc_record_text_parses_or_is_ignored(text: str) -> None:
    record = parse_record(text)
    if record is not None:
        usable = record.usable()
        assert usable is None or usable.p in ("none", "quarantine", "reject")
        assert 0 <= record.pct <= 100


@given(ANY_TEXT, st.sampled_from(["mx.example.com", "MX.Example.COM."]))
@example('"mx.example.com"; dmarc=pass', "mx.example.com")
def test_the_forged_results_matcher_answers_any_field(value: str, ours: str) -> None:
    claimed = authres.authserv_id_of(value)
    assert claimed == claimed.lower()
    # a field that starts with our id, after any comments, is recognised
    assert authres.authserv_id_of(f"(x) {ours} ; spf=pass") == ours.lower().rstrip(".")


@given(ANY_TEXT, st.lists(st.tuples(st.sampled_from(["smtp", "header"]),
                                    st.sampled_from(["mailfrom", "d", "from", "helo"]),
                                    ANY_TEXT), max_size=4))
def test_rendered_results_stay_one_field_whatever_the_values(reason: str,
                                                             props: list[Any]) -> None:
    text = authres.render("mx.example.com", (AuthResEntry("spf", Result.PASS, reason=reason,
                                                          properties=tuple(props)),))
    assert "\r" not in text and "\n" not in text.replace("\n\t", "")
    assert text.isascii()


@given(ANY_TEXT)
@example("x; spf=pass (" + "(" * 600)
@example('"a\\"b"@c.example; dkim=pass header.i="x y"@d.example')
def test_any_authentication_results_value_gets_a_defined_answer(value: str) -> None:
    """The ARC parsers (issue 10): an answer for any value, never an exception."""
    got = authresults.parse(value)
    if got is not None:
        for info in got.results:
            assert info.method == info.method.lower() and info.result == info.result.lower()
            assert "\r" not in info.text and "\n" not in info.text
            assert all(k == k.lower() and "." in k for k, _ in info.properties)
    instance = authresults.aar_instance(value)
    assert instance is None or 0 <= instance <= 99
    aar = authresults.parse_aar(value)
    assert aar is None or aar[0] == instance


@given(st.lists(st.tuples(st.sampled_from(["spf", "dkim", "dmarc", "arc"]),
                          st.sampled_from(list(Result)), ANY_TEXT, ANY_TEXT,
                          st.lists(st.tuples(st.sampled_from(["smtp", "header", "policy"]),
                                             st.sampled_from(["mailfrom", "d", "from", "helo",
                                                              "remote-ip", "oldest-pass"]),
                                             ANY_TEXT), max_size=3)),
                min_size=1, max_size=4))
@example([("spf", Result.PASS, "", "", [("smtp", "mailfrom", "=@1")])])  # found by make fuzz
def test_what_we_render_our_parser_reads_back(entries: list[Any]) -> None:
    """Every Authentication-Results we write reads back, one result per entry: what ARC
    sealing copies into an ARC-Authentication-Results is never lost."""
    rendered = authres.render("mx.example.com", tuple(
        AuthResEntry(method, result, reason=reason, comment=comment,
                     properties=tuple(props)) for method, result, reason, comment, props
        in entries))
    got = authresults.parse(rendered)
    assert got is not None and got.authserv_id == "mx.example.com"
    assert [(r.method, r.result) for r in got.results] == [(m, str(r)) for m, r, *_ in entries]


ARC_FIELD = st.tuples(st.sampled_from(["ARC-Seal", "ARC-Message-Signature",
                                       "ARC-Authentication-Results", "arc-seal"]),
                      st.one_of(ANY_TEXT, st.builds(
                          lambda i, rest: f"i={i}; {rest}",
                          st.sampled_from(["1", "2", "0", "51", "01", " 1", "x"]), GRAMMAR),
                          st.builds(lambda i, cv: f"i={i}; a=rsa-sha256; cv={cv}; d=x; s=y; "
                                                  "b=AAAA; bh=AAAA; h=from",
                                    st.sampled_from(["1", "2", "3"]),
                                    st.sampled_from(["none", "pass", "fail", "x"]))))


@given(st.lists(ARC_FIELD, max_size=12))
@example([("ARC-Seal", "i=1; a=rsa-sha256; cv=none; d=x; s=y; b=AAAA"),
          ("ARC-Message-Signature", "i=1; a=rsa-sha256; d=x; s=y; b=AAAA; bh=AAAA; h=from"),
          ("ARC-Authentication-Results", "i=1; x; none")])
def test_any_arc_fields_give_a_chain_or_a_reason(fields: list[tuple[str, str]]) -> None:
    """The ARC structure readers (RFC 8617 §5.2 steps 1-3) answer any set of fields with the
    sets or a reason, never another exception."""
    headers = index_headers([(n, " " + v) for n, v in fields])
    try:
        sets = arcsets.read_sets(headers)
        for s in sets:
            arc._validate_tags(s)
        arc._cv(sets)
    except arcsets.Broken as exc:
        assert str(exc)
        return
    assert [s.instance for s in sets] == list(range(1, len(sets) + 1))
    assert all(len(s.fields) == 3 for s in sets)


PRIVATE = st.sampled_from(["10.1.2.3", "192.168.0.9", "172.16.5.5", "127.0.0.1", "fd00::5",
                           "IPv6:fe80::1", "100.64.1.1"])


@given(st.lists(st.one_of(PRIVATE, GRAMMAR, st.sampled_from(["[", "]", " from ", ":25"])),
                max_size=12))
@example(["::", "10.1.2.3"])  # found by make fuzz: an IPv4 inside an IPv6 literal
def test_trace_rewriting_leaves_no_private_address(parts: list[str]) -> None:
    value = " " + "".join(parts)
    cfg = make_config("[check.trace]\naction = rewrite\ninternal_hosts = corp.example\n")
    snap = snapshot_of(cfg)
    ctx = Context(site=cfg.milter, dns=snap.resolver.bind(Budget(1)), rates=snap.rates)
    link = next(li for li in cfg.chain if li.name == "trace")
    assert isinstance(link.settings, TraceSettings)
    out = _sanitise(Header("Received", value, 1), link.settings, ctx)
    text = value if out is None else out
    for run in re.findall(r"[A-Za-z0-9_.:-]+", text):
        for part in (run, *run.split(":")):
            ip = parse_ip(part)
            assert not in_networks(ip, PRIVATE_NETWORKS), (value, text)


INI_KEYS = st.sampled_from(["socket", "mode", "checks", "timeout", "budget", "listen",
                            "trusted_networks", "enabled", "reject_reply", "limits", "keys",
                            "nameservers", "spool_threshold", "bogus", "cache", "redis_url",
                            "dane_resolver", "ca_file", "map_name", "max_policy_size",
                            "allow_private_addresses"])
INI_SECTIONS = st.sampled_from(["milter", "dns", "metrics", "policy", "check.tls",
                                "check.dmarc", "check.ratelimit", "check.spam", "sts"])


@given(st.lists(st.tuples(INI_SECTIONS, INI_KEYS, GRAMMAR), max_size=6))
def test_any_config_loads_or_says_why(entries: list[tuple[str, str, str]]) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    for section, key, value in entries:
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value.replace("\r", " ").replace("\n", " "))
    lines = []
    for section in parser.sections():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in parser[section].items()]
    try:
        loads("\n".join(lines) + "\n", "fuzz.ini")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.ini")


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=4), st.booleans())
def test_the_body_hash_answers_any_body(body: bytes, cuts: list[int], relaxed: bool) -> None:
    h = BodyHash(relaxed=relaxed, hash_name="sha256")
    start = 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        h.update(body[start:cut])
        start = cut
    h.update(body[start:])
    assert len(h.digest()) == 32


# -- the adapter: callbacks in any order, macros missing or huge ---------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("helo"), ANY_TEXT),
    st.tuples(st.just("envfrom"), ANY_TEXT),
    st.tuples(st.just("envrcpt"), ANY_TEXT),
    st.tuples(st.just("header"), st.tuples(st.sampled_from(["From", "DKIM-Signature",
                                                             "Authentication-Results", "Bcc",
                                                             "Received", "X-\u00e9",
                                                             "ARC-Seal",
                                                             "ARC-Message-Signature",
                                                             "ARC-Authentication-Results"]),
                                           ANY_TEXT)),
    st.tuples(st.just("body"), st.binary(max_size=200)),
    st.tuples(st.just("eom"), st.none()),
    st.tuples(st.just("abort"), st.none()),
    st.tuples(st.just("macro"), st.tuples(st.sampled_from(["{tls_version}", "{auth_authen}",
                                                            "i", "{cipher}"]),
                                          st.one_of(st.none(), ANY_TEXT,
                                                    st.just("x" * 100_000)))),
), max_size=25)
CODES = {Milter.CONTINUE, Milter.ACCEPT, Milter.REJECT, Milter.TEMPFAIL, Milter.DISCARD}


STAGES = {"helo": Milter.M_HELO, "envfrom": Milter.M_ENVFROM, "envrcpt": Milter.M_ENVRCPT,
          "header": Milter.M_EOH, "body": Milter.M_EOH, "eom": Milter.M_EOM,
          "abort": Milter.M_EOM}


@given(OPS)
@example([("eom", None), ("envrcpt", "a@b"), ("body", b"x"), ("abort", None), ("eom", None)])
def test_callbacks_in_any_order_never_raise(ops: list[tuple[str, Any]]) -> None:
    """An MTA (or a local client speaking the protocol) may call anything in any order."""
    ctx, runtime = session()
    assert ctx._connect(host="client.example", helo="client.example", ip="203.0.113.5") in CODES
    milter = ctx._priv
    for op, arg in ops:
        if op == "macro":
            name, value = arg
            if value is None:
                ctx._macros.pop(name, None)
            else:
                ctx._setsymval(name, value)
            continue
        ctx._stage = STAGES[op]  # what libmilter knows while a callback runs
        try:
            if op == "header":
                rc = milter.header(arg[0], arg[1])
            elif op == "body":
                rc = milter.body(arg)
            elif op in ("eom", "abort"):
                rc = getattr(milter, op)()
            else:
                rc = getattr(milter, "hello" if op == "helo" else op)(arg)
        finally:
            ctx._stage = None
        assert rc in CODES or rc == Milter.NOREPLY, (op, rc)
    ctx._close()
    registry = runtime.metrics.registry
    assert registry.get_sample_value("mailward_connections_active") == 0
    errors = [s for m in registry.collect() if m.name == "mailward_errors" for s in m.samples
              if s.name.endswith("_total") and s.value]
    assert not errors, errors


class _AnswersAll:
    """A resolver whose every TXT name holds the same records (so include: loops on itself)."""

    def __init__(self, records: list[bytes]) -> None:
        self.records = tuple(records)
        self.asked = 0

    def txt(self, name: str) -> tuple[bytes, ...]:
        self.asked += 1
        return self.records


SPFISH = st.lists(st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from(["v=spf1", "include:x.example", "redirect=x.example", "a", "mx",
                              "-all", "~all", "ptr", "exists:%{i}", "v=DMARC1;", "p=reject;",
                              "rua=", "t=y", "v=STSv1;", "v=TLSRPTv1;", "=", ";", " "]),
             max_size=12).map(lambda words: " ".join(words).encode())), max_size=3)


@given(SPFISH)
@example([b"v=spf1 include:x.example -all"])  # include loops on itself: bounded
def test_audit_judges_any_dns_answer(records: list[bytes]) -> None:
    resolver = _AnswersAll(records)
    findings = audit.domain_findings("x.example", resolver, [])  # type: ignore[arg-type]
    assert {f.check for f in findings} >= {"spf", "dmarc", "mta-sts", "tls-rpt"}
    assert all(f.status in ("pass", "warn", "fail") for f in findings)
    assert resolver.asked <= audit.MAX_SPF_RECORDS + 10


@given(ANY_TEXT)
def test_audit_reads_any_tls_protocols_value(value: str) -> None:
    old = audit._tls_allows_old(value)
    assert set(old) <= set(audit.OLD_TLS)


# -- MTA-STS (issue 12): policies, TXT records, netstrings, HTTP responses, cache entries ----

POLICY_LINE = st.one_of(
    st.sampled_from(["version: STSv1", "mode: enforce", "mode: testing", "mode: none",
                     "max_age: 86400", "max_age: 99999999999", "mx: mail.example.com",
                     "mx: *.example.net", "mx: *.*.x", "mx:", "x_ext: 1", ""]),
    st.builds(lambda k, v: f"{k}:{v}", st.sampled_from(["mx", "mode", "max_age", "version"]),
              GRAMMAR))
POLICY_TEXT = st.one_of(
    st.lists(POLICY_LINE, max_size=12).flatmap(
        lambda lines: st.sampled_from(["\n", "\r\n"]).map(lambda end: end.join(lines))),
    ANY_TEXT)


@given(POLICY_TEXT)
@example("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n")
def test_any_policy_text_parses_or_is_refused_with_a_reason(text: str) -> None:
    try:
        found = parse_policy(text)
    except PolicyError as exc:
        assert str(exc)
        return
    assert 0 <= found.max_age <= 31557600
    assert found.mode is not StsMode.ENFORCE or found.mx
    answer = postfix_answer(found)
    # what Postfix is told is one line of printable ASCII, whatever the policy said
    assert answer is None or (answer.isascii() and answer.isprintable())


@given(st.lists(st.one_of(st.binary(max_size=80),
                          st.sampled_from([b"v=STSv1; id=abc;", b"v=STSv1;id=",
                                           b"v=STSv1; id=a; x=\xff"])), max_size=4))
def test_any_sts_txt_records_give_an_id_or_none(records: list[bytes]) -> None:
    found = parse_txt(tuple(records))
    assert found is None or re.fullmatch(r"[A-Za-z0-9]{1,32}", found)


@given(st.binary(max_size=60), st.integers(0, 2000))
@example(b"0:,", 10)
def test_any_bytes_are_a_netstring_more_needed_or_refused(data: bytes, limit: int) -> None:
    try:
        found = netstring.decode(data, limit)
    except netstring.NetstringError:
        return
    if found is not None:
        payload, rest = found
        assert len(payload) <= limit and netstring.encode(payload) + rest == data


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda status, ctype, body: (
                     f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode() + body,
                     st.sampled_from([200, 301, 404, 999]),
                     st.sampled_from(["text/plain", "text/html", "text/plain; charset=x"]),
                     st.binary(max_size=200))),
       st.booleans())
def test_any_https_response_gives_a_policy_or_a_fetch_error(raw: bytes, complete: bool) -> None:
    try:
        policy, text = _parse_response("mta-sts.example", raw, complete, 150)
    except FetchError as exc:
        assert exc.outcome in STS_FETCHES
        return
    assert complete and len(text.encode()) <= 150 and policy.mode in tuple(StsMode)


@given(st.one_of(st.binary(max_size=200), st.builds(
    lambda v: json.dumps({"domain": "a.example", "policy_id": "1", "fetched": 0, "expires": 1,
                          "checked": 0, "policy": v}),
    st.dictionaries(st.sampled_from(["mode", "max_age", "mx"]),
                    st.one_of(st.integers(), st.text(max_size=5),
                              st.lists(st.text(max_size=12), max_size=3)), max_size=3))))
def test_any_cache_entry_reads_back_or_is_a_cache_error(raw: bytes | str) -> None:
    try:
        entry = Entry.from_json(raw)
    except CacheError:
        return
    assert Entry.from_json(entry.to_json()) == entry


# -- DMARC aggregate reports (issue 11): XML, decompression, report mail -------------------------

REPORT_XML = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda parts: ("<feedback>" + "".join(parts) + "</feedback>").encode(),
              st.lists(st.sampled_from([
                  "<report_metadata><org_name>o</org_name><report_id>1</report_id>"
                  "<date_range><begin>1</begin><end>2</end></date_range></report_metadata>",
                  "<policy_published><domain>example.org</domain><p>reject</p>"
                  "</policy_published>",
                  "<record><row><source_ip>192.0.2.1</source_ip><count>1</count>"
                  "<policy_evaluated><disposition>none</disposition><dkim>pass</dkim>"
                  "<spf>fail</spf></policy_evaluated></row><identifiers><header_from>"
                  "example.org</header_from></identifiers><auth_results/></record>",
                  "<record><row><source_ip>x</source_ip></row></record>",
                  "<!DOCTYPE x [<!ENTITY e 'a'>]>", "&amp;", "<count>-1</count>", "\x00"]),
                  max_size=6)))


@given(REPORT_XML)
def test_any_report_xml_is_read_or_refused_with_a_reason(data: bytes) -> None:
    try:
        found = parse_report(data, max_records=5)
    except ReportError as exc:
        assert str(exc)
        return
    assert found.rows and len(found.rows) <= 5
    assert all(r.count >= 0 and r.disposition in ("none", "pass", "quarantine", "reject")
               for r in found.rows)


@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(gzip.compress),
                 st.binary(max_size=300).map(lambda b: gzip.compress(b)[:-3])))
def test_any_report_file_unpacks_within_its_limit_or_is_refused(data: bytes) -> None:
    try:
        found = xml_of(data, 200)
    except ReportError:
        return
    assert len(found) <= 200


@given(st.binary(max_size=600), st.sampled_from([b"application/gzip", b"text/xml",
                                                   b"application/zip", b"multipart/mixed"]))
def test_any_report_mail_gives_attachments_or_a_reason(body: bytes, ctype: bytes) -> None:
    raw = b"From: a@b.example\r\nContent-Type: " + ctype + b"\r\n\r\n" + body
    try:
        found = attachments(raw, 1000)
    except ReportError:
        return
    assert all(len(xml) <= 1000 for _, xml in found)


# -- the asyncio engine's milter protocol (issue 9): frames, fields, any command order -------

@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=5))
@example(b"\x00\x00\x00\x00", [])
@example(b"\xff\xff\xff\xffO", [2])
def test_any_byte_stream_splits_into_packets_or_is_refused(data: bytes,
                                                           cuts: list[int]) -> None:
    reader = proto.Reader(limit=512)
    got: list[tuple[bytes, bytes]] = []
    try:
        for start, end in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True):
            got += reader.feed(data[start:end])
    except proto.ProtocolError:
        return
    rebuilt = b"".join(proto.packet(command, body) for command, body in got)
    assert rebuilt + data[len(rebuilt):] == data and reader.pending == len(data) - len(rebuilt)


@given(st.binary(max_size=300))
@example(b"4\x00")
@example(b"host\x006\x00\x19")
def test_every_field_parser_answers_any_bytes(data: bytes) -> None:
    for parse in (proto.options, proto.macros, proto.connect, proto.header, proto.strings):
        try:
            parse(data)
        except proto.ProtocolError:
            pass


class _Transport(asyncio.Transport):
    """What a Connection writes and does to its socket, without one."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


MILTER_PACKETS = st.lists(st.one_of(
    st.just(proto.packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))),
    st.tuples(st.sampled_from(list(b"DCHMRTLNBEAKUQZO")), st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"<a@b.example>\0", b"Mi\0Q1\0", b"From\0 x@b.example\0",
                         b"h\x004\x00\x19203.0.113.5\0", b"h\0", b""])))
    .map(lambda t: proto.packet(bytes([t[0]]), t[1]))), max_size=30)


@given(MILTER_PACKETS)
@example([proto.packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
          proto.packet(b"E"), proto.packet(b"R", b"<x@y>\0"), proto.packet(b"K"),
          proto.packet(b"B", b"x"), proto.packet(b"E")])
def test_any_command_sequence_gets_replies_or_a_closed_connection(packets: list[bytes]) -> None:
    """Checks that never wait (no DNS): every stage stays inline, on a loop that never runs."""
    runtime = _aio_runtime()
    loop = asyncio.new_event_loop()
    try:
        engine = aio.Engine(runtime, socket="unix:/nonexistent", timeout=60)
        engine._loop = loop
        conn = aio.Connection(engine)
        transport = _Transport()
        conn.connection_made(transport)
        conn.received(b"".join(packets))
        assert not conn.busy
        replies = proto.Reader().feed(transport.written)  # well-formed packets only
        assert all(command in b"OcartdyhimqQ" for command, _ in replies)
        conn.connection_lost(None)
    finally:
        loop.close()
        engine.pool.shutdown()
    assert runtime.metrics.connections_active._value.get() == 0
    assert runtime.drain.open == 0


def _aio_runtime() -> Any:
    from tests.adapter.test_milter import Runtime  # noqa: PLC0415
    return Runtime(make_config("[milter]\nauthserv_id = mx.example.com\n"
                               "[policy]\nchecks = tls, bcc, trace, authres\n"))


# dkimpy's own expression for emptying b=, rebuilt from its folding white space (dkimcrypto
# replaces it in dkimpy's namespace with B_TAG)
DKIMPY_BTAG = re.compile(rb"([;\s]b" + dkimpy.FWS + rb"=)(?:" + dkimpy.FWS
                         + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")


@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.sampled_from([b"b", b"=", b";", b" ", b"\t", b"\r", b"\n", b"\r\n",
                                           b"A", b"+", b"/", b"x", b"-", b"b=", b"\x0b"]),
                          max_size=80).map(b"".join)))
@example(b" v=1; b=QS/A Vr\r\n\tVv==\r\n")
@example(b"b = A \r\n B ;b=\n")
def test_our_b_tag_expression_empties_what_dkimpys_does(field: bytes) -> None:
    assert dkimpy.RE_BTAG is dkimcrypto.B_TAG  # replaced, being the expression we compare
    assert DKIMPY_BTAG.pattern == dkimcrypto.DKIMPY_B_TAG
    assert dkimcrypto.B_TAG.sub(rb"\1", field) == DKIMPY_BTAG.sub(rb"\1", field)


@functools.cache
def rsa_1024() -> dict[str, int]:
    """dkimpy's private key dictionary for a new 1024-bit key (once per run)."""
    with tempfile.TemporaryDirectory() as d:
        material = keys.generate(domain="example.com", selector="s", bits=1024,
                                 directory=d).material
    return dict(dkim_crypto.parse_pem_private_key(material))


@given(st.binary(max_size=140),
       st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), max_size=3),
       st.booleans())
@example(b"", [(1, 2)], True)  # block type 2
@example(b"", [(127, 0)], True)  # the last octet of the digest
def test_rsa_verification_agrees_with_openssl(raw: bytes, edits: list[tuple[int, int]],
                                              shaped: bool) -> None:
    """dkimcrypto.verify (our exponentiation) against OpenSSL's verification, on signatures
    as sent (arbitrary bytes) and on blocks a forger signs: the encoding with a few octets
    changed."""
    private = rsa_1024()
    n, e = int(private["modulus"]), int(private["publicExponent"])
    h = hashlib.sha256(b"signed fields")
    public = {"modulus": n, "publicExponent": e}
    signature = raw
    if shaped:
        block = bytearray(dkimcrypto.encoding(h, 128))
        for index, value in edits:
            block[index] = value
        m = int.from_bytes(block, "big") % n
        signature = pow(m, int(private["privateExponent"]), n).to_bytes(128, "big")
    ours = dkimcrypto.verify(h, signature, public)
    assert ours == dkimcrypto._openssl_verify(h, signature, n, e)
