"""Who sends as our domains, from the reports others sent us: by source address and reporting
organisation, with SPF/DKIM/DMARC pass rates and the dispositions receivers applied; failing
sources first (a spoofer, or a mail service someone forgot to add to SPF).

Reports whose own mail did not pass DMARC are kept apart and shown only on request: anyone can
mail a forged report to a published `rua` address.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from mailward.services.reportstore import IngestedReport


@dataclass
class Source:
    policy_domain: str
    source_ip: str
    reporter: str
    messages: int = 0
    spf_pass: int = 0
    dkim_pass: int = 0
    dmarc_pass: int = 0
    dispositions: Counter[str] = field(default_factory=Counter)
    header_from: set[str] = field(default_factory=set)

    def rate(self, n: int) -> float:
        return round(100.0 * n / self.messages, 1) if self.messages else 0.0

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["dispositions"] = dict(self.dispositions)
        data["header_from"] = sorted(self.header_from)
        data |= {"spf_rate": self.rate(self.spf_pass), "dkim_rate": self.rate(self.dkim_pass),
                 "dmarc_rate": self.rate(self.dmarc_pass)}
        return data


def select(reports: list[IngestedReport], *, domain: str = "",
           authenticated: bool = True) -> list[IngestedReport]:
    return [r for r in reports if r.authenticated is authenticated
            and (not domain or r.policy_domain == domain.lower().rstrip("."))]


def reporter(report: IngestedReport) -> str:
    """The reporting organisation as the report names it, and, when the report mail came
    from a domain that is not that name's, that domain too: passing DMARC proves who sent
    the mail, not what organisation the report claims to be from."""
    m = re.search(r"header\.from=(\S+)", report.auth_detail)
    sender = m.group(1).lower() if m else ""
    org = report.org_name.lower()
    if sender and not (org == sender or org.endswith("." + sender)
                       or sender.endswith("." + org)):
        return f"{report.org_name} (mail from {sender})"
    return report.org_name


def sources(reports: list[IngestedReport]) -> list[Source]:
    found: dict[tuple[str, str, str], Source] = {}
    for report in reports:
        for row in report.rows:
            key = (report.policy_domain, row.source_ip, reporter(report))
            s = found.setdefault(key, Source(*key))
            s.messages += row.count
            s.spf_pass += row.count if row.spf_aligned == "pass" else 0
            s.dkim_pass += row.count if row.dkim_aligned == "pass" else 0
            s.dmarc_pass += row.count if "pass" in (row.spf_aligned, row.dkim_aligned) else 0
            s.dispositions[row.disposition] += row.count
            s.header_from.add(row.header_from)
    return sorted(found.values(),
                  key=lambda s: (s.rate(s.dmarc_pass), -s.messages, s.policy_domain,
                                 s.source_ip, s.reporter))


def table(found: list[Source]) -> str:
    if not found:
        return "no reports in this period\n"
    lines = [f"{'domain':<24} {'source':<40} {'reporter':<24} {'messages':>8} {'dmarc':>6} "
             f"{'spf':>6} {'dkim':>6}  dispositions"]
    for s in found:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(s.dispositions.items()))
        lines.append(f"{s.policy_domain:<24} {s.source_ip:<40} {s.reporter[:24]:<24} "
                     f"{s.messages:>8} {s.rate(s.dmarc_pass):>5}% {s.rate(s.spf_pass):>5}% "
                     f"{s.rate(s.dkim_pass):>5}%  {shown}")
    return "\n".join(lines) + "\n"


def daily(reports: list[IngestedReport]) -> list[dict[str, object]]:
    """Messages and DMARC pass rate per day (of each report's begin), oldest first."""
    days: dict[str, list[int]] = {}
    for report in reports:
        day = time.strftime("%Y-%m-%d", time.gmtime(report.begin))
        counts = days.setdefault(day, [0, 0])
        for row in report.rows:
            counts[0] += row.count
            counts[1] += row.count if "pass" in (row.spf_aligned, row.dkim_aligned) else 0
    return [{"day": d, "messages": n, "pass_rate": round(100.0 * p / n, 1) if n else 0.0}
            for d, (n, p) in sorted(days.items())]


# The page draws its chart from the embedded data with a few lines of script, so the file
# needs nothing from the network. `</` is escaped in the data: no report text ends the script.
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>mailward: who sends as {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }}
th:nth-child(-n+3), td:nth-child(-n+3) {{ text-align: left; }}
tr.fail td {{ background: #fde8e8; }}
#chart rect.volume {{ fill: #8fb3d9; }}
#chart polyline {{ fill: none; stroke: #2a7a2a; stroke-width: 2; }}
</style></head><body>
<h1>Who sends as {title}</h1>
<p>{summary}</p>
<h2>Volume and DMARC pass rate per day</h2>
<svg id="chart" width="720" height="240" role="img"
 aria-label="messages and pass rate per day"></svg>
<h2>Sources, failing first</h2>
<table id="sources"><thead><tr><th>domain</th><th>source</th><th>reporter</th><th>messages</th>
<th>DMARC pass</th><th>SPF pass</th><th>DKIM pass</th><th>dispositions</th></tr></thead>
<tbody>{rows}</tbody></table>
<script id="data" type="application/json">{data}</script>
<script>
(function () {{
  var days = JSON.parse(document.getElementById("data").textContent);
  var svg = document.getElementById("chart"), ns = "http://www.w3.org/2000/svg";
  var w = 720, h = 240, pad = 30, n = Math.max(days.length, 1);
  var most = Math.max.apply(null, days.map(function (d) {{ return d.messages; }}).concat([1]));
  var step = (w - 2 * pad) / n, points = [];
  days.forEach(function (d, i) {{
    var bar = document.createElementNS(ns, "rect"), height = (h - 2 * pad) * d.messages / most;
    bar.setAttribute("class", "volume");
    bar.setAttribute("x", pad + i * step + 2); bar.setAttribute("width", Math.max(step - 4, 1));
    bar.setAttribute("y", h - pad - height); bar.setAttribute("height", height);
    bar.setAttribute("data-day", d.day);
    var title = document.createElementNS(ns, "title");
    title.textContent = d.day + ": " + d.messages + " messages, " + d.pass_rate + "% pass";
    bar.appendChild(title); svg.appendChild(bar);
    points.push((pad + (i + 0.5) * step) + "," + (h - pad - (h - 2 * pad) * d.pass_rate / 100));
  }});
  var line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" ")); svg.appendChild(line);
  svg.setAttribute("data-drawn", String(days.length));
}})();
</script></body></html>
"""


def page(found: list[Source], days: list[dict[str, object]], *, title: str,
         summary: str) -> str:
    rows = []
    for s in found:
        css = ' class="fail"' if s.rate(s.dmarc_pass) < 100 else ""
        shown = ", ".join(f"{k} {v}" for k, v in sorted(s.dispositions.items()))
        cells = [s.policy_domain, s.source_ip, s.reporter, str(s.messages),
                 f"{s.rate(s.dmarc_pass)}%", f"{s.rate(s.spf_pass)}%",
                 f"{s.rate(s.dkim_pass)}%", shown]
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + "</tr>")
    data = json.dumps(days).replace("</", "<\\/")
    return _PAGE.format(title=html.escape(title), summary=html.escape(summary),
                        rows="\n".join(rows), data=data)
