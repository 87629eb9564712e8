"""Building one period's aggregate reports (RFC 9990 §2): one per DMARC Policy Domain, XML
gzipped under the RFC's file name, with the destinations its `rua` asks for and may have.

A destination outside the Policy Domain's Organizational Domain must agree to receive its
reports (§4, "Verifying External Destinations"): a TXT record `v=DMARC1` at
`POLICY-DOMAIN._report._dmarc.DESTINATION-DOMAIN`. A destination that does not, a `rua` that
is no `mailto:` URI, and a report over `[reports] max_report_size` are skipped with the reason.
The `!size` suffix of a `rua` (RFC 7489) is obsolete in DMARCbis and ignored.
"""

from __future__ import annotations

import calendar
import functools
import gzip
import time
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from mailward import __version__
from mailward.core.settings import parse_mailbox
from mailward.reports.aggregate import Report, aggregate, render
from mailward.services.dns import DnsError, Resolver
from mailward.services.reportstore import SqlStore


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@dataclass(frozen=True)
class Destination:
    uri: str  # as the rua gave it
    address: str  # the mailbox, or "" when unusable
    problem: str = ""  # why it is skipped


@dataclass(frozen=True)
class Built:
    report: Report
    xml: bytes
    gz: bytes
    filename: str
    destinations: tuple[Destination, ...]
    problem: str = ""  # why the whole report is not sent (e.g. too large)


def period(spec: str, now: float | None = None) -> tuple[int, int]:
    """`yesterday`, `today` (what there is of it so far) or `YYYY-MM-DD`, as [begin, end)
    in UTC seconds: a whole day."""
    now = time.time() if now is None else now
    today = int(now) - int(now) % 86400
    if spec == "yesterday":
        return today - 86400, today
    if spec == "today":
        return today, today + 86400
    try:
        day = calendar.timegm(time.strptime(spec, "%Y-%m-%d"))
    except ValueError:
        raise ValueError(f"--period {spec!r}: expected yesterday, today or YYYY-MM-DD"
                         ) from None
    return day, day + 86400


def org_domain(domain: str) -> str:
    return str(_psl().privatesuffix(domain.lower()) or domain.lower())


def destinations(policy_domain: str, rua: str, resolver: Resolver) -> tuple[Destination, ...]:
    out = []
    for uri in (u.strip() for u in rua.split(",") if u.strip()):
        if not uri.lower().startswith("mailto:"):
            out.append(Destination(uri, "", "not a mailto: URI"))
            continue
        try:  # `!size` is obsolete: ignored
            address = parse_mailbox(uri[7:].split("!", 1)[0])
        except ValueError:
            address = ""
        if not address:
            out.append(Destination(uri, "", "not a mail address"))
            continue
        target = address.rpartition("@")[2].rstrip(".")
        if org_domain(target) != org_domain(policy_domain):
            name = f"{policy_domain}._report._dmarc.{target}"
            try:
                agreed = any(r.lower().startswith(b"v=dmarc1") for r in resolver.txt(name))
            except DnsError as exc:
                out.append(Destination(uri, "", f"cannot verify {name}: {exc}"))
                continue
            if not agreed:
                out.append(Destination(uri, "", f"external destination not verified: no "
                                                f"v=DMARC1 record at {name}"))
                continue
        out.append(Destination(uri, address))
    return tuple(out)


def report_id(org_name: str, policy_domain: str, begin: int) -> str:
    """Stable for a domain and period, so a resent report keeps its id and file name."""
    return f"{begin}.{policy_domain}@{org_name}"


def build(store: SqlStore, *, org_name: str, email: str, begin: int, end: int,
          resolver: Resolver, max_size: int) -> list[Built]:
    """The reports of [begin, end), one per Policy Domain with messages in it."""
    out = []
    for domain, (policy, rows) in aggregate(store.messages(begin, end)).items():
        report = Report(org_name=org_name, email=email,
                        report_id=report_id(org_name, domain, begin), begin=begin, end=end - 1,
                        policy_domain=domain, policy=policy, rows=rows,
                        generator=f"mailward {__version__}")
        xml = render(report)
        gz = gzip.compress(xml, mtime=0)
        filename = f"{org_name}!{domain}!{begin}!{end - 1}.xml.gz"
        rua = dict(policy).get("rua", "")
        problem = (f"{len(gz)} bytes gzipped, over max_report_size ({max_size})"
                   if len(gz) > max_size else "" if rua else "the policy asks for no reports")
        out.append(Built(report, xml, gz, filename,
                         destinations(domain, rua, resolver) if rua else (), problem))
    return out
