"""The metrics' label values known in advance match what the code can produce."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from mailward.adapter import milter as adapter
from mailward.core.transaction import Direction
from mailward.core.verdict import Action
from mailward.services import metrics
from mailward.services.metrics import Metrics


def test_known_label_values_match_the_core() -> None:
    assert set(metrics.DIRECTIONS) == {str(d) for d in Direction}
    assert set(metrics.VERDICTS) == {str(a) for a in Action}
    stages = re.findall(r'_guarded\("(\w+)"\)', Path(adapter.__file__).read_text())
    assert sorted(metrics.STAGES) == sorted(stages)


def test_series_that_alerts_use_exist_at_zero_from_the_start() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert 'mailward_messages_total{direction="outbound",verdict="tempfail"} 0.0' in text
    assert 'mailward_dmarc_failures_total{policy="reject"} 0.0' in text
    assert 'mailward_errors_total{stage="eom"} 0.0' in text
    assert 'mailward_config_reloads_total{outcome="failed"} 0.0' in text
