"""Aggregate reports as XML both ways, against the schema in ../shared/reference; hostile
reports (entities, external references, bombs, floods of records) refused with the reason."""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import struct
import zipfile
from pathlib import Path

import pytest
from lxml import etree

from mailward.reports.aggregate import Report, ReportError, aggregate, parse, render
from mailward.reports.build import period, report_id
from mailward.reports.unpack import Bomb, attachments, gunzip, unzip, xml_of
from mailward.services.reportstore import MessageRecord

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reports"  # the draft's XSD, copied
SCHEMA = etree.XMLSchema(etree.parse(str(REFERENCE / "dmarc-aggregate-report-0.2.xsd")))


def rows() -> list[MessageRecord]:
    base = dict(policy_domain="example.org", header_from="example.org",
                envelope_from="example.org", disposition="pass", dkim_aligned="pass",
                spf_aligned="pass", dkim=(("example.org", "s1", "pass"),),
                spf=("example.org", "mailfrom", "pass"),
                policy=(("p", "reject"), ("sp", "quarantine"), ("adkim", "s"),
                        ("testing", "n"), ("discovery_method", "treewalk"),
                        ("rua", "mailto:d@example.org")))
    spoof = base | dict(disposition="reject", dkim_aligned="fail", spf_aligned="fail",
                        dkim=(), spf=("evil.example", "mailfrom", "fail"),
                        envelope_from="evil.example")
    monitored = spoof | dict(disposition="none",
                             reasons=(("local_policy", "monitor mode: would reject"),))
    out = [MessageRecord(time=1_800_000_000 + i, source_ip="192.0.2.1", **base)  # type: ignore[arg-type]
           for i in range(3)]
    out += [MessageRecord(time=1_800_000_100, source_ip="2001:db8::6", **spoof),  # type: ignore[arg-type]
            MessageRecord(time=1_800_000_200, source_ip="203.0.113.9", **monitored),  # type: ignore[arg-type]
            MessageRecord(time=1_800_000_300, source_ip="192.0.2.1", **(base | dict(  # type: ignore[arg-type]
                policy_domain="other.example", header_from="other.example")))]
    return out


def report_of(domain: str = "example.org") -> Report:
    policy, grouped = aggregate(rows())[domain]
    return Report("mx.example.net", "dmarc-reports@example.net",
                  report_id("mx.example.net", domain, 1_799_971_200), 1_799_971_200,
                  1_800_057_599, domain, policy, grouped, "mailward test")


def test_one_report_per_policy_domain_and_one_record_per_distinct_outcome() -> None:
    found = aggregate(rows())
    assert sorted(found) == ["example.org", "other.example"]
    policy, grouped = found["example.org"]
    assert dict(policy)["p"] == "reject"
    assert [(r.source_ip, r.count, r.disposition) for r in grouped] == [
        ("192.0.2.1", 3, "pass"), ("2001:db8::6", 1, "reject"), ("203.0.113.9", 1, "none")]
    assert grouped[2].reasons == (("local_policy", "monitor mode: would reject"),)


def test_rendered_reports_are_valid_against_the_schema_and_read_back() -> None:
    report = report_of()
    xml = render(report)
    document = etree.fromstring(xml)
    SCHEMA.assertValid(document)
    back = parse(xml, max_records=100)
    assert (back.org_name, back.report_id, back.begin, back.end, back.policy_domain) == (
        report.org_name, report.report_id, report.begin, report.end, report.policy_domain)
    assert back.rows == tuple(r.__class__(r.source_ip, r.count, r.disposition, r.dkim_aligned,
                                          r.spf_aligned, r.header_from, r.envelope_from,
                                          r.dkim, r.spf, r.reasons) for r in report.rows)
    assert dict(back.policy) == {"p": "reject", "sp": "quarantine", "adkim": "s",
                                 "testing": "n", "discovery_method": "treewalk"}


def test_control_characters_from_a_message_never_break_the_xml() -> None:
    report = report_of()
    row = report.rows[0]
    odd = row.__class__(row.source_ip, row.count, row.disposition, row.dkim_aligned,
                        row.spf_aligned, row.header_from, row.envelope_from,
                        (("example.org", "s1\x01\x1b[31m", "pass"),))
    xml = render(Report(report.org_name, report.email, report.report_id, report.begin,
                        report.end, report.policy_domain, report.policy, (odd,)))
    SCHEMA.assertValid(etree.fromstring(xml))
    assert parse(xml, max_records=5).rows[0].dkim == (("example.org", "s1??[31m", "pass"),)


def test_a_spammers_dkim_domain_costs_only_its_own_entry() -> None:
    xml = render(report_of()).replace(b"<domain>example.org</domain><selector>s1",
                                      b"<domain>exa!mple</domain><selector>s1", 1)
    found = parse(xml, max_records=10)
    assert found.rows[0].dkim == () and len(found.rows) == 3


def test_the_schema_check_can_fail() -> None:
    broken = render(report_of()).replace(b"<disposition>pass", b"<disposition>maybe")
    assert not SCHEMA.validate(etree.fromstring(broken))


def test_the_drafts_example_and_an_rfc7489_report_are_read() -> None:
    example = parse((REFERENCE / "dmarc-aggregate-report-example-0.2.xml").read_bytes(),
                    max_records=10)
    assert (example.org_name, example.rows[0].count, example.rows[0].source_ip) == (
        "Sample Reporter", 123, "192.0.2.123")
    old = b"""<?xml version="1.0" encoding="UTF-8" ?>
<feedback><report_metadata><org_name>google.com</org_name><email>noreply@google.com</email>
<report_id>1234</report_id><date_range><begin>1700000000</begin><end>1700086399</end>
</date_range></report_metadata><policy_published><domain>example.org</domain><adkim>r</adkim>
<aspf>r</aspf><p>none</p><sp>none</sp><pct>100</pct></policy_published>
<record><row><source_ip>209.85.220.41</source_ip><count>2</count><policy_evaluated>
<disposition>none</disposition><dkim>pass</dkim><spf>pass</spf></policy_evaluated></row>
<identifiers><header_from>example.org</header_from></identifiers><auth_results><dkim>
<domain>example.org</domain><result>pass</result><selector>s1</selector></dkim><spf>
<domain>example.org</domain><result>pass</result></spf></auth_results></record></feedback>"""
    found = parse(old, max_records=10)
    assert (found.org_name, found.policy_domain, found.rows[0].count) == (
        "google.com", "example.org", 2)


HOSTILE = {
    "external entity": b"""<?xml version="1.0"?><!DOCTYPE f [<!ENTITY x SYSTEM
        "file:///etc/passwd">]><feedback>&x;</feedback>""",
    "entity expansion": b"""<?xml version="1.0"?><!DOCTYPE f [<!ENTITY a "aaaaaaaaaa">
        <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">
        ]><feedback>&c;</feedback>""",
    "not xml": b"\x00\x01 hello",
    "wrong root": b"<html><body/></html>",
    "no record": render(report_of()).split(b"<record>")[0] + b"</feedback>",
    "bad address": render(report_of()).replace(b"192.0.2.1<", b"192.0.2.999<"),
    "bad count": render(report_of()).replace(b"<count>3<", b"<count>-3<"),
    "huge count": render(report_of()).replace(b"<count>3<", b"<count>99999999999999999<"),
    "bad domain": render(report_of()).replace(b"<header_from>example.org",
                                              b"<header_from>exa mple.org"),
    "control characters": render(report_of()).replace(b"mx.example.net<",
                                                      b"mx.example.net&#x1b;[31m<"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_reports_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(ReportError) as found:
        parse(HOSTILE[name], max_records=100)
    assert str(found.value)


def test_too_many_records_are_refused() -> None:
    xml = render(report_of())
    with pytest.raises(ReportError, match="more than 2 records"):
        parse(xml, max_records=2)


def test_bounded_decompression() -> None:
    xml = render(report_of())
    assert gunzip(gzip.compress(xml), 10**6) == xml
    assert xml_of(gzip.compress(xml), 10**6) == xml
    bomb = gzip.compress(b"<" + b" " * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(Bomb):
        gunzip(bomb, 1_000_000)
    with pytest.raises(ReportError, match="truncated"):
        gunzip(gzip.compress(xml)[:-20], 10**6)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("report.xml", xml)
    assert unzip(zipped.getvalue(), 10**6) == xml
    zip_bomb = io.BytesIO()
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.xml", b" " * 50_000_000)
    with pytest.raises(Bomb):
        unzip(zip_bomb.getvalue(), 1_000_000)
    # a header that lies about the size is no help: the read stops at the limit
    lying = bytearray(zip_bomb.getvalue())
    central = lying.rfind(b"PK\x01\x02")
    lying[central + 24:central + 28] = (100).to_bytes(4, "little")  # uncompressed size
    with pytest.raises(ReportError):
        unzip(bytes(lying), 1_000_000)
    with pytest.raises(ReportError, match="neither"):
        xml_of(b"%PDF-1.4", 10**6)


def test_attachments_of_report_mail() -> None:
    xml = render(report_of())
    raw = (b"From: noreply@google.com\r\nTo: dmarc@example.org\r\nSubject: Report\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/gzip\r\n"
           b"Content-Disposition: attachment; filename=\"g!example.org!1!2.xml.gz\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n")
    raw += base64.encodebytes(gzip.compress(xml)).replace(b"\n", b"\r\n") + b"--b--\r\n"
    assert attachments(raw, 10**6) == [("g!example.org!1!2.xml.gz", xml)]
    # many attachments together are bounded as one
    many = raw.replace(b"--b--\r\n", b"") + b"\r\n".join(
        [b"--b\r\nContent-Type: text/xml\r\n\r\n" + xml] * 5) + b"\r\n--b--\r\n"
    with pytest.raises(Bomb):
        attachments(many, len(xml) * 3)
    with pytest.raises(ReportError, match="no report attached"):
        attachments(b"From: a@b.example\r\n\r\nno report here\r\n", 10**6)


def test_periods() -> None:
    now = 1_800_000_000  # 2027-01-15 08:00 UTC
    assert period("yesterday", now) == (1_799_884_800, 1_799_971_200)
    assert period("today", now) == (1_799_971_200, 1_800_057_600)
    assert period("2027-01-01", now) == (1_798_761_600, 1_798_848_000)
    with pytest.raises(ValueError, match="--period"):
        period("last week", now)


# -- from the hostile review of 2026-12-04 ------------------------------------------------------

def test_a_bzip2_zip_member_is_refused_before_it_is_inflated() -> None:
    """A 450-byte zip whose bzip2 member inflates to 400 MB in one go took the process to
    822 MB before; it is refused without decompressing anything."""
    comp = bz2.compress(b"<" + b"a" * (40 << 20), 9)
    name = b"r.xml"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 46, 0, 12, 0, 0, 0, len(comp), 10,
                        len(name), 0) + name
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 46, 46, 0, 12, 0, 0, 0,
                          len(comp), 10, len(name), 0, 0, 0, 0, 0, 0) + name
    zipped = local + comp + central + struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(comp), 0)
    with pytest.raises(ReportError, match="compressed with method 12"):
        xml_of(zipped, 20 << 20)


def test_elements_other_than_records_are_not_kept() -> None:
    """Twenty megabytes of `<a/>` at the top held 508 MB before; now they are bounded in
    number and dropped as they are read."""
    flood = b"<feedback>" + b"<a/>" * 100_000 + b"</feedback>"
    with pytest.raises(ReportError, match="too many or too deeply nested"):
        parse(flood, max_records=10)
    deep = b"<feedback>" + b"<a>" * 50 + b"</a>" * 50 + b"</feedback>"
    with pytest.raises(ReportError, match="too many or too deeply nested"):
        parse(deep, max_records=10)
    padded = render(report_of()).replace(b"<record>", b"<junk>x</junk><record>", 1)
    assert len(parse(padded, max_records=10).rows) == 3


@pytest.mark.parametrize("bad", ["fe80::1%\u202eevil", "192.0.2.1%eth0"])
def test_a_scope_id_or_a_format_character_is_refused(bad: str) -> None:
    xml = render(report_of()).replace(b">192.0.2.1<", f">{bad}<".encode(), 1)
    with pytest.raises(ReportError):
        parse(xml, max_records=10)


def test_deeply_nested_mime_is_a_rejected_report_not_an_error() -> None:
    raw = b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(3000):
        raw += f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode()
    with pytest.raises(ReportError):
        attachments(raw, 10**6)
