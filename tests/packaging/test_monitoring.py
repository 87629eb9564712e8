"""The Grafana dashboard and the Prometheus alerts: valid PromQL, alerts that fire when they
should (promtool's own rule tests), and only metric names mailward exports.

That each name exists in the exposition of a running mailward is checked through the lab in
tests/integration/test_postfix.py (`test_dashboard_and_alerts_query_exported_metrics`); here
the names are checked against the metrics' declarations.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from mailward.services.metrics import Metrics
from tests.conftest import need

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
DASHBOARD = PACKAGING / "grafana" / "mailward.json"
RULES = PACKAGING / "prometheus" / "mailward-rules.yml"
RULE_TESTS = PACKAGING / "prometheus" / "mailward-rules.test.yml"

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$instance": ".*",
                     "$job": "mailward"}


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [str(rule["expr"]) for g in groups for rule in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The mailward metric names a PromQL expression reads. Label values and other strings
    are removed first, so `job="mailward_x"` names nothing; label names never start with
    mailward_."""
    code = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    return set(re.findall(r"(?<![\w:])mailward_[a-z0-9_]+", code))


def exported_names(exposition: str) -> set[str]:
    """The sample names an exposition can carry, from its # TYPE lines (a labelled metric has
    no sample before its first event)."""
    names: set[str] = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\w+)$", exposition, re.M):
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        elif kind == "counter" and not family.endswith("_total"):
            names.add(f"{family}_total")
        else:
            names.add(family)
    return names


def unknown_names(exposition: str) -> dict[str, set[str]]:
    """Per query, the mailward names it reads that the exposition does not carry."""
    exported = exported_names(exposition)
    out = {}
    for expr in dashboard_queries() + rule_queries():
        missing = metric_names(expr) - exported
        if missing:
            out[expr] = missing
    return out


def test_names_are_read_out_of_promql_with_care() -> None:
    expr = ('sum by (check, le) (rate(mailward_check_duration_seconds_bucket{job="mailward_x",'
            'instance=~"$instance"}[5m])) / mailward_messages_total and up')
    assert metric_names(expr) == {"mailward_check_duration_seconds_bucket",
                                  "mailward_messages_total"}


def test_every_query_reads_declared_metrics() -> None:
    assert len(dashboard_queries()) >= 12 and len(rule_queries()) == 6
    assert unknown_names(generate_latest(Metrics().registry).decode()) == {}
    # and a misspelt name is caught
    assert unknown_names("# TYPE mailward_messages_total counter\n")


def test_dashboard_covers_what_an_operator_watches() -> None:
    text = "\n".join(dashboard_queries())
    for name in ("mailward_messages_total", "mailward_check_results_total",
                 "mailward_dmarc_failures_total", "mailward_check_duration_seconds_bucket",
                 "mailward_dns_queries_total", "mailward_connections_active"):
        assert name in text
    assert "by (direction, verdict)" in text and 'outcome="cached"' in text
    assert 'verdict="tempfail"' in text and "histogram_quantile(0.99" in text


def test_rules_pass_promtool_and_its_rule_tests(tmp_path: Path) -> None:
    need(shutil.which("promtool") is not None,
         "promtool is missing: apt-get install prometheus")
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested == {"MailwardDown", "MailwardMilterErrors",
                                "MailwardTempfailRatioHigh", "MailwardDnsTimeouts",
                                "MailwardNoTraffic", "MailwardReloadFailed"}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query (Grafana's variables substituted) as a recording
    rule."""
    need(shutil.which("promtool") is not None,
         "promtool is missing: apt-get install prometheus")
    rules = []
    for n, query in enumerate(dashboard_queries()):
        expr = query
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query{n}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
