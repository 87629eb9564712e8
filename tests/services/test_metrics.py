"""The metrics' label values known in advance match what the code can produce."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from mailward.adapter import aio
from mailward.adapter import milter as adapter
from mailward.core.transaction import Direction
from mailward.core.verdict import Action
from mailward.services import metrics
from mailward.services.metrics import Metrics


def test_known_label_values_match_the_core() -> None:
    assert set(metrics.DIRECTIONS) == {str(d) for d in Direction}
    assert set(metrics.VERDICTS) == {str(a) for a in Action}
    stages = re.findall(r'_guarded\("(\w+)"\)', Path(adapter.__file__).read_text())
    stages += re.findall(r'labels\(stage="(\w+)"\)', Path(aio.__file__).read_text())
    assert sorted(metrics.STAGES) == sorted(stages)


def test_series_that_alerts_use_exist_at_zero_from_the_start() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert 'mailward_messages_total{direction="outbound",verdict="tempfail"} 0.0' in text
    assert 'mailward_dmarc_failures_total{policy="reject"} 0.0' in text
    assert 'mailward_errors_total{stage="eom"} 0.0' in text
    assert 'mailward_config_reloads_total{outcome="failed"} 0.0' in text


def test_cached_children_count_into_the_same_series() -> None:
    m = Metrics()
    for _ in range(3):
        m.observe_check("dkim", 0.002)
        m.count_result("dkim", "pass")
    m.count_result("dkim", "fail")
    m.check_results.labels(check="dkim", result="pass").inc()  # the usual way: one series
    sample = m.registry.get_sample_value
    assert sample("mailward_check_duration_seconds_count", {"check": "dkim"}) == 3
    assert sample("mailward_check_duration_seconds_bucket", {"check": "dkim", "le": "0.001"}) == 0
    assert sample("mailward_check_duration_seconds_bucket", {"check": "dkim", "le": "0.0025"}) == 3
    assert sample("mailward_check_results_total", {"check": "dkim", "result": "pass"}) == 4
    assert sample("mailward_check_results_total", {"check": "dkim", "result": "fail"}) == 1
