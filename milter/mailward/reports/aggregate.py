"""DMARC aggregate reports (RFC 9990) as XML, both ways. Pure: no I/O.

`aggregate` groups one period's message rows into one report per DMARC Policy Domain, one
`record` per distinct (source, results, identifiers, disposition); `render` writes the XML the
schema (../shared/reference/dmarc-aggregate-report-0.2.xsd) accepts; `parse` reads a report
someone sent us, RFC 9990's namespaced form or RFC 7489's plain one. Parsing trusts nothing:
defusedxml refuses DTDs, entities and external references; the number of records, every count,
address, domain and string is bounded; anything else is a `ReportError` with the reason.
"""

from __future__ import annotations

import io
import ipaddress
import re
import unicodedata
import xml.etree.ElementTree as ET  # building only: parsing uses defusedxml
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from mailward.services.reportstore import IngestedReport, MessageRecord, ReportRow

NS = "urn:ietf:params:xml:ns:dmarc-2.0"
MAX_TEXT = 255
MAX_COUNT = 10**12
MAX_DEPTH = 8  # feedback/record/auth_results/dkim/domain is 5 deep
MAX_ELEMENTS_PER_RECORD = 200  # a record is about 25; room for extensions
POLICY_TAGS = ("p", "sp", "np", "adkim", "aspf", "discovery_method", "testing")
DISPOSITIONS = ("none", "pass", "quarantine", "reject")
DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
SPF_RESULTS = ("none", "pass", "fail", "softfail", "policy", "neutral", "temperror",
               "permerror")
OVERRIDES = ("local_policy", "mailing_list", "other", "policy_test_mode", "trusted_forwarder",
             "forwarded", "sampled_out")  # the last two: RFC 7489's, still sent by some
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                     r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?")


class ReportError(ValueError):
    """A report we refuse; the message says why."""


@dataclass(frozen=True, slots=True)
class Report:
    """One aggregate report to send: a Policy Domain, a period and its records."""

    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    policy_domain: str
    policy: tuple[tuple[str, str], ...]
    rows: tuple[ReportRow, ...]
    generator: str = ""

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.rows)


def aggregate(messages: Iterable[MessageRecord]) -> dict[str, tuple[tuple[tuple[str, str], ...],
                                                                    tuple[ReportRow, ...]]]:
    """Per Policy Domain: the policy as last published in the period, and its rows."""
    counts: dict[str, Counter[tuple[object, ...]]] = {}
    policies: dict[str, tuple[tuple[str, str], ...]] = {}
    for m in messages:
        key = (m.source_ip, m.disposition, m.dkim_aligned, m.spf_aligned, m.header_from,
               m.envelope_from, m.dkim, (m.spf[0], m.spf[2]) if m.spf[0] else None, m.reasons)
        counts.setdefault(m.policy_domain, Counter())[key] += 1
        policies[m.policy_domain] = m.policy
    out = {}
    for domain, counter in sorted(counts.items()):
        rows = tuple(ReportRow(str(k[0]), n, str(k[1]), str(k[2]), str(k[3]), str(k[4]),
                               str(k[5]), k[6], (k[7],) if k[7] else (), k[8])  # type: ignore[arg-type]
                     for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))
        out[domain] = (policies[domain], rows)
    return out


_CONTROL = dict.fromkeys(range(32), "?")


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    el = ET.SubElement(parent, f"{{{NS}}}{tag}")
    if text is not None:
        # what a message carried (a DKIM selector, say) may hold control characters, which
        # XML 1.0 cannot: they would make the whole report unreadable
        el.text = str(text).translate(_CONTROL)
    return el


def render(report: Report) -> bytes:
    """The report as RFC 9990 XML (UTF-8, with a declaration)."""
    root = ET.Element(f"{{{NS}}}feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", report.org_name)
    _sub(meta, "email", report.email)
    _sub(meta, "report_id", report.report_id)
    dates = _sub(meta, "date_range")
    _sub(dates, "begin", report.begin)
    _sub(dates, "end", report.end)
    if report.generator:
        _sub(meta, "generator", report.generator)
    published = _sub(root, "policy_published")
    _sub(published, "domain", report.policy_domain)
    policy = dict(report.policy)
    for tag in POLICY_TAGS:
        value = policy.get(tag) or ("none" if tag == "p" else "")
        if value:
            _sub(published, tag, value)
    for row in report.rows:
        record = _sub(root, "record")
        r = _sub(record, "row")
        _sub(r, "source_ip", row.source_ip)
        _sub(r, "count", row.count)
        evaluated = _sub(r, "policy_evaluated")
        _sub(evaluated, "disposition", row.disposition)
        _sub(evaluated, "dkim", row.dkim_aligned)
        _sub(evaluated, "spf", row.spf_aligned)
        for kind, comment in row.reasons:
            reason = _sub(evaluated, "reason")
            _sub(reason, "type", kind)
            if comment:
                _sub(reason, "comment", comment)
        ids = _sub(record, "identifiers")
        _sub(ids, "header_from", row.header_from)
        if row.envelope_from:
            _sub(ids, "envelope_from", row.envelope_from)
        auth = _sub(record, "auth_results")
        for domain, selector, result in row.dkim:
            dkim = _sub(auth, "dkim")
            _sub(dkim, "domain", domain)
            _sub(dkim, "selector", selector or "none")
            _sub(dkim, "result", result if result in DKIM_RESULTS else "permerror")
        for domain, result in row.spf[:1]:
            spf = _sub(auth, "spf")
            _sub(spf, "domain", domain)
            _sub(spf, "scope", "mfrom")
            _sub(spf, "result", result if result in SPF_RESULTS else "permerror")
    ET.register_namespace("", NS)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


# -- reading reports others send -----------------------------------------------------------------

def _local(tag: object) -> str:
    return str(tag).rpartition("}")[2]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element | None, name: str, *, required: bool = False) -> str:
    found = _child(el, name) if el is not None else None
    text = (found.text or "").strip() if found is not None else ""
    if required and not text:
        raise ReportError(f"<{name}> missing")
    if len(text) > MAX_TEXT:
        raise ReportError(f"<{name}> longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or unicodedata.category(c) == "Cf"
           for c in text):
        raise ReportError(f"<{name}> holds control or format characters")
    return text


def _int(el: ET.Element | None, name: str, *, maximum: int = MAX_COUNT) -> int:
    text = _text(el, name, required=True)
    if not (text.isascii() and text.isdigit() and len(text) <= 13 and int(text) <= maximum):
        raise ReportError(f"<{name}> {text[:40]!r} is not a count")
    return int(text)


def _domain(text: str, what: str, *, required: bool = True) -> str:
    name = text.lower().rstrip(".")
    if not name and not required:
        return ""
    if not _DOMAIN.fullmatch(name):
        raise ReportError(f"{what} {text[:80]!r} is not a domain name")
    return name


def _word(text: str, allowed: tuple[str, ...], what: str) -> str:
    word = text.lower()
    if word not in allowed:
        raise ReportError(f"{what} {text[:40]!r} is not one of {', '.join(allowed)}")
    return word


def parse(data: bytes, *, max_records: int) -> IngestedReport:
    """A report's XML as a (not yet stored) IngestedReport; ReportError when malformed.

    The XML is read as a stream and each record dropped once converted, so memory follows
    the number of records (bounded by `max_records`), not the size of the document."""
    meta, published, rows = _stream(data, max_records)
    if meta is None or published is None:
        raise ReportError("<report_metadata> or <policy_published> missing")
    dates = _child(meta, "date_range")
    begin, end = _int(dates, "begin"), _int(dates, "end")
    if end < begin:
        raise ReportError("date_range ends before it begins")
    policy = []
    for tag in POLICY_TAGS:
        value = _text(published, tag)
        if value:
            policy.append((tag, value.lower()[:20]))
    if not rows:
        raise ReportError("no <record>")
    return IngestedReport(
        received=0, source="", status="accepted",
        org_name=_text(meta, "org_name", required=True),
        org_email=_text(meta, "email"),
        report_id=_text(meta, "report_id", required=True), begin=begin, end=end,
        policy_domain=_domain(_text(published, "domain", required=True), "policy domain"),
        policy=tuple(policy), rows=tuple(rows))


def _stream(data: bytes, max_records: int) -> tuple[  # noqa: PLR0912 - one pass, each event
        ET.Element | None, ET.Element | None, list[ReportRow]]:
    """<report_metadata>, <policy_published> and the records, read as the XML streams."""
    meta = published = None
    rows: list[ReportRow] = []
    depth = elements = 0
    root: ET.Element | None = None
    try:
        for event, el in SafeET.iterparse(io.BytesIO(data), events=("start", "end"),
                                          forbid_dtd=True, forbid_entities=True,
                                          forbid_external=True):
            if event == "start":
                depth += 1
                elements += 1
                if depth > MAX_DEPTH or elements > MAX_ELEMENTS_PER_RECORD * (max_records + 2):
                    raise ReportError("too many or too deeply nested elements")
                if depth == 1:
                    if _local(el.tag) != "feedback":
                        raise ReportError(f"root element <{_local(el.tag)}>, not <feedback>")
                    root = el
                continue
            depth -= 1
            if depth != 1:
                continue
            name = _local(el.tag)
            if name == "record":
                if len(rows) >= max_records:
                    raise ReportError(f"more than {max_records} records")
                rows.append(_row(el))
            elif name == "report_metadata" and meta is None:
                meta = el
                continue
            elif name == "policy_published" and published is None:
                published = el
                continue
            if root is not None:  # nothing else at the top is kept: memory follows records
                root.remove(el)
    except DefusedXmlException as exc:
        raise ReportError(f"refused XML: {type(exc).__name__}") from None
    except (ET.ParseError, ValueError) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"not well-formed XML: {exc}") from None
    return meta, published, rows


def _dkim_entry(el: ET.Element) -> tuple[str, str, str] | None:
    """One auth_results <dkim>, or None when unreadable: the raw results come from messages
    the reporter saw, which a spammer wrote (a d= naming no domain), and must not cost the
    domain owner the whole report."""
    try:
        return (_domain(_text(el, "domain", required=True), "dkim domain"),
                _text(el, "selector")[:64],
                _word(_text(el, "result", required=True), DKIM_RESULTS, "dkim result"))
    except ReportError:
        return None


def _spf_entry(el: ET.Element) -> tuple[str, str] | None:
    try:
        return (_domain(_text(el, "domain", required=True), "spf domain"),
                _word(_text(el, "result", required=True), SPF_RESULTS, "spf result"))
    except ReportError:
        return None


def _row(record: ET.Element) -> ReportRow:
    row = _child(record, "row")
    if row is None:
        raise ReportError("<record> without <row>")
    ip = _text(row, "source_ip", required=True)
    try:
        if "%" in ip:  # a scope id is free text
            raise ValueError(ip)
        source = str(ipaddress.ip_address(ip))
    except ValueError:
        raise ReportError(f"source_ip {ip[:60]!r} is not an IP address") from None
    evaluated = _child(row, "policy_evaluated")
    if evaluated is None:
        raise ReportError("<row> without <policy_evaluated>")
    reasons = []
    for reason in _children(evaluated, "reason")[:8]:
        kind = _text(reason, "type", required=True).lower()
        reasons.append((kind if kind in OVERRIDES else "other", _text(reason, "comment")))
    ids = _child(record, "identifiers")
    auth = _child(record, "auth_results")
    found_dkim = [_dkim_entry(d) for d in (_children(auth, "dkim")[:16] if auth is not None
                                           else [])]
    found_spf = [_spf_entry(e) for e in (_children(auth, "spf")[:4] if auth is not None
                                         else [])]
    dkim = tuple(d for d in found_dkim if d is not None)
    spf = tuple(e for e in found_spf if e is not None)
    return ReportRow(
        source_ip=source, count=_int(row, "count"),
        disposition=_word(_text(evaluated, "disposition", required=True), DISPOSITIONS,
                          "disposition"),
        dkim_aligned=_word(_text(evaluated, "dkim", required=True), ("pass", "fail"),
                           "policy_evaluated dkim"),
        spf_aligned=_word(_text(evaluated, "spf", required=True), ("pass", "fail"),
                          "policy_evaluated spf"),
        header_from=_domain(_text(ids, "header_from", required=True), "header_from"),
        envelope_from=_domain(_text(ids, "envelope_from"), "envelope_from", required=False),
        dkim=dkim, spf=spf, reasons=tuple(reasons))
