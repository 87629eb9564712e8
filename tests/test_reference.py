"""Documentation that cannot drift (issue 13, item 7): the configuration and metrics
references are generated from the code, and the annotated conf/mailward.ini, the committed
references and the migration notes must agree with it."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from mailward import __version__, cli, reference
from mailward.checks import REGISTRY
from mailward.services.metrics import Metrics, StsMetrics

REPO = Path(__file__).resolve().parents[1]
CONF = (REPO / "conf" / "mailward.ini").read_text()
REGENERATE = "docs/ is out of date: run `make docs` and commit the result"


def test_the_annotated_file_and_the_code_agree() -> None:
    assert reference.disagreements(REGISTRY, CONF, cli.REFERENCE_LOADERS) == []


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace("\nspool_dir =\n", "\n"),
     "[milter] spool_dir: read by the code, missing from the annotated file"),
    (lambda t: t.replace("\nlog_level = info\n", "\nlog_level = info\nlog_colour = no\n"),
     "[milter] log_colour: in the annotated file, unknown to the code"),
    (lambda t: t.replace("\ncache_size = 10000\n", "\ncache_size = 20000\n"),
     "the annotated file sets 'cache_size = 20000', the code's default is 'cache_size = 10000'"),
    (lambda t: t.replace("# Our own domains. Mail from us to these only is \"internal\" rather "
                         "than \"outbound\".\n", "\n"),
     "[milter] local_domains: no comment above it says what it means"),
])
def test_each_kind_of_disagreement_is_found(edit: object, expected: str) -> None:
    changed = edit(CONF)  # type: ignore[operator]
    assert changed != CONF
    found = reference.disagreements(REGISTRY, changed, cli.REFERENCE_LOADERS)
    assert any(d.startswith(expected) for d in found), found


def test_the_committed_references_are_what_the_code_generates() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == \
        reference.configuration_md(REGISTRY, CONF, cli.REFERENCE_LOADERS), REGENERATE
    assert (REPO / "docs" / "metrics.md").read_text() == \
        reference.metrics_md([Metrics(), StsMetrics()]), REGENERATE


def test_the_committed_manual_page_is_what_the_code_generates() -> None:
    assert (REPO / "docs" / "mailward.8").read_text() == \
        reference.man_page(cli.build_parser(), __version__), REGENERATE


def test_the_manual_page_names_every_command_and_option_and_renders_cleanly() -> None:
    page = reference.man_page(cli.build_parser(), __version__)
    commands = next(a for a in cli.build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert f'.SS "{reference.roff(name)}"' in page, name
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"\\fB{reference.roff(option)}\\fR" in page, (name, option)
    groff = subprocess.run(["groff", "-ww", "-z", "-man"], input=page, capture_output=True,
                           text=True, check=False)
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr


@pytest.mark.parametrize(("text", "expected"), [
    (".TH injected", "\\&.TH injected"), ("'quote", "\\&'quote"),
    ("a\\b-c", "a\\eb\\-c"), ("two\n.lines", "two\n\\&.lines")])
def test_roff_text_cannot_become_a_request(text: str, expected: str) -> None:
    assert reference.roff(text) == expected


def test_the_configuration_reference_lists_every_key_with_its_form_and_default() -> None:
    text = reference.configuration_md(REGISTRY, CONF, cli.REFERENCE_LOADERS)
    keys = reference.code_keys(REGISTRY, cli.REFERENCE_LOADERS)
    for (section, key), k in keys.items():
        if section.startswith("check.") and key in reference.COMMON_CHECK_KEYS:
            continue
        part = text.split(f"## [{section}]\n", 1)[1].split("\n## ", 1)[0]
        row = next((r for r in part.splitlines() if r.startswith(f"| `{key}` |")), None)
        assert row is not None, (section, key)
        assert f"| {k.expected.replace('|', chr(92) + '|')} |" in row
        assert f"`{reference.format_default(k.default)}`" in row
    assert "| `dmarc` |" not in text and "## [check.dmarc]" in text
    assert "| `min_version` | one of " in text  # an enum's form names its choices


def test_the_metrics_reference_lists_every_exported_metric() -> None:
    text = reference.metrics_md([Metrics()])
    m = Metrics()
    m.check_results.labels(check="spf", result="pass").inc()
    m.check_duration.labels(check="spf").observe(0.001)
    exported = {s.name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for family in m.registry.collect() for s in family.samples
                if not s.name.endswith("_created")}
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert exported <= documented, exported - documented
    assert "| `mailward_check_results_total` | counter | check, result |" in text


def test_the_migration_notes_name_only_keys_that_exist() -> None:
    notes = (REPO / "docs" / "migrating.md").read_text()
    keys = reference.code_keys(REGISTRY, cli.REFERENCE_LOADERS)
    named = re.findall(r"`\[([a-z_.]+)\] ([a-z_]+)", notes)
    assert len(named) >= 25  # the notes map settings, they do not just mention mailward
    missing = [f"[{s}] {k}" for s, k in named if (s, k) not in keys]
    assert missing == []
    for peer_setting in ("KeyTable", "SigningTable", "InternalHosts", "RejectFailures",
                         "SPFSelfValidate", "TrustedAuthservIDs", "FailureReports"):
        assert f"`{peer_setting}`" in notes


def test_the_refusal_guide_shows_the_log_line_mailward_writes() -> None:
    guide = (REPO / "docs" / "why-refused.md").read_text()
    adapter = (REPO / "milter" / "mailward" / "adapter" / "milter.py").read_text()
    fields = re.findall(r"([a-z_]+)=<?%[sd]", adapter.split("def _log", 1)[1].split("def ", 1)[0])
    assert {"qid", "direction", "verdict", "gen"} <= set(fields)
    sample = next(line for line in guide.splitlines() if " verdict=" in line and "qid=" in line)
    for field in fields:
        assert f"{field}=" in sample, field
    assert "mailward scan" in guide
