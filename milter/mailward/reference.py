"""The configuration and metrics references, generated from the code so they cannot drift.

The configuration reference takes every key from the code itself: `ini.recording` collects
what the loaders read (section, key, expected form, default) while an empty configuration is
loaded. The meaning of each key is the comment above it in `conf/mailward.ini`, the annotated
reference file, and `tests/test_reference.py` fails when that file and the code disagree (a key
one has and the other lacks, or a default the file shows that the code does not use). The
metrics reference reads the names, types, labels and help texts from the `Metrics` registry.
`make docs` writes both into docs/; `mailward docs config|metrics` prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from mailward.core import config as configmod
from mailward.core import ini
from mailward.core.check import Registry
from mailward.errors import ConfigError

# Keys every [check.NAME] section has; conf/mailward.ini documents them once, not per check.
COMMON_CHECK_KEYS = ("enabled", "mode", "on_error", "quarantine")

_SECTION_RE = re.compile(r"\[([a-z0-9_.]+)\]\s*\Z")
_KEY_RE = re.compile(r"#?([a-z0-9_]+) = ?(.*)\Z")  # `key = value` or a commented `#key = value`


@dataclass(frozen=True)
class Documented:
    """What conf/mailward.ini says of a key: its comment and the line that shows it."""

    section: str
    key: str
    meaning: str
    shown: str  # the value on the key's line
    commented: bool  # `#key = ...`: an example, not the default


def code_keys(registry: Registry, extra: Iterable[Callable[[], object]] = ()
              ) -> dict[tuple[str, str], ini.Key]:
    """Every key the configuration loader reads, with its expected form and default.

    `extra` loads sections read outside `config.load` (a service's own section), each from an
    empty configuration.
    """
    with ini.recording() as found:
        configmod.loads("", registry)
        for load in extra:
            load()
    return found


def disagreements(registry: Registry, text: str,
                  extra: Iterable[Callable[[], object]] = ()) -> list[str]:
    """Where the annotated INI `text` and the code disagree; empty when they agree."""
    code = code_keys(registry, extra)
    shown = conf_keys(text)
    out = []
    for (section, key) in code:
        if section.startswith("check.") and key in COMMON_CHECK_KEYS:
            continue  # documented once, under [policy]
        doc = shown.get((section, key))
        if doc is None:
            out.append(f"[{section}] {key}: read by the code, missing from the annotated file")
        elif not doc.meaning:
            out.append(f"[{section}] {key}: no comment above it says what it means")
    for (section, key) in shown:
        if (section, key) not in code:
            out.append(f"[{section}] {key}: in the annotated file, unknown to the code (a "
                       "section read outside config.load needs its loader in "
                       "cli.REFERENCE_LOADERS)")
    defaults = configmod.describe(configmod.loads("", registry)).splitlines()
    try:
        effective = configmod.describe(configmod.loads(text, registry)).splitlines()
    except ConfigError as exc:
        return [*out, f"the annotated file does not load: {exc}"]
    for got, want in zip(effective, defaults, strict=False):
        if got != want:
            out.append(f"the annotated file sets {got!r}, the code's default is {want!r}")
    return out


def conf_keys(text: str) -> dict[tuple[str, str], Documented]:
    """The keys an annotated INI file shows, each with the comment block above it.

    A key right after another (no blank or comment line between) shares its comment, as
    `timeout` and `lifetime` in [dns] do. Comment lines indented after `#` right below a key
    are examples of its value (`keys` in [check.dkim_sign]); elsewhere they are part of the text.
    """
    out: dict[tuple[str, str], Documented] = {}
    section = ""
    comment: list[str] = []
    last = ""  # the meaning of the key just above, shared by a key that follows at once
    previous: tuple[str, str] | None = None  # that key, while examples may still follow
    for line in text.splitlines():
        stripped = line.strip()
        m = _SECTION_RE.match(stripped)
        if m:
            section, comment, last, previous = m.group(1), [], "", None
            continue
        k = _KEY_RE.match(stripped)
        if k and section:
            meaning = " ".join(comment) or last
            previous = (section, k.group(1))
            out[previous] = Documented(section, k.group(1), meaning, k.group(2).strip(),
                                       stripped.startswith("#"))
            comment, last = [], meaning
            continue
        if stripped.startswith("#"):
            body = stripped[1:]
            if previous and not comment and body[:2].isspace():
                doc = out[previous]  # an example of the key above
                out[previous] = dataclasses.replace(
                    doc, meaning=f"{doc.meaning} Example: `{body.strip()}`.")
                continue
            previous, last = None, "" if not comment else last
            comment.append(body.strip())
        elif not stripped:
            comment, last, previous = [], "", None
    return out


def format_default(value: object) -> str:
    """A default as the INI would write it."""
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            host = f"[{value[0]}]" if ":" in value[0] else value[0]
            return f"{host}:{value[1]}"  # an address with its port
        return ", ".join(format_default(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def configuration_md(registry: Registry, conf_text: str,
                     extra: Iterable[Callable[[], object]] = ()) -> str:
    """docs/configuration.md: every section and key, its form, default and meaning."""
    keys = code_keys(registry, extra)
    documented = conf_keys(conf_text)
    lines = ["# Configuration reference", "",
             "Generated from the code by `make docs` (`mailward docs config`); do not edit.",
             "Meanings are the comments of `conf/mailward.ini`, the annotated reference file,",
             "which shows every key with its default. Lists are separated by commas or spaces.",
             ""]
    sections: list[str] = []
    for section, _ in keys:
        if section not in sections:
            sections.append(section)
    common = [k for k in keys.values() if k.section.startswith("check.")
              and k.key in COMMON_CHECK_KEYS]
    for section in sections:
        lines += [f"## [{section}]", "", "| key | form | default | meaning |",
                  "|---|---|---|---|"]
        for k in keys.values():
            if k.section != section or (section.startswith("check.")
                                        and k.key in COMMON_CHECK_KEYS):
                continue
            doc = documented.get((section, k.key))
            meaning = doc.meaning if doc else ""
            lines.append(f"| `{k.key}` | {_cell(k.expected)} | "
                         f"`{_cell(format_default(k.default))}` | {_cell(meaning)} |")
        lines.append("")
    if common:
        seen: dict[str, ini.Key] = {}
        for k in common:
            seen.setdefault(k.key, k)
        lines += ["## Keys of every [check.NAME] section", "", "| key | form | default |",
                  "|---|---|---|"]
        defaults = {"enabled": "yes", "mode": "[milter] mode", "on_error": "[policy] on_error",
                    "quarantine": "[policy] quarantine"}
        for name in COMMON_CHECK_KEYS:
            if name in seen:
                lines.append(f"| `{name}` | {_cell(seen[name].expected)} | {defaults[name]} |")
        lines.append("")
    return "\n".join(lines)


def metrics_md(metrics: Iterable[object]) -> str:
    """docs/metrics.md: every metric of the given holders (e.g. a `Metrics`), its type,
    labels and help text."""
    lines = ["# Metrics reference", "",
             "Generated from the code by `make docs` (`mailward docs metrics`); do not edit.",
             "Prometheus names as exported (counters carry `_total`; histograms `_bucket`,",
             "`_sum` and `_count`). Labels are bounded: never an address or a domain we did",
             "not configure.", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
    rows = []
    for holder in metrics:
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = getattr(metric, "_labelnames", ())  # prometheus_client keeps them here
            for family in metric.describe():
                name = family.name + ("_total" if family.type == "counter" else "")
                rows.append(f"| `{name}` | {family.type} | {', '.join(labels)} | "
                            f"{_cell(family.documentation)} |")
    return "\n".join(lines + sorted(rows)) + "\n"


# -- the manual page -----------------------------------------------------------------------

MAN_SECTIONS = """\
.SH FILES
.TP
.I /etc/mailward/mailward.ini
The one configuration file of the milter, \\fBmailward sts\\fR and \\fBmailward reports\\fR.
Each key is described in the comments of the shipped file and in the configuration reference
under /usr/share/doc/mailward/.
.SH SIGNALS
.TP
.B SIGTERM, SIGINT, SIGHUP
\\fBmailward run\\fR stops gracefully: new transactions get 421, those in flight may finish
within \\fB[milter] stop_grace\\fR. A second signal stops at once.
.TP
.B SIGUSR1
Reload the configuration (\\fBsystemctl reload mailward\\fR). A file that does not load is
logged and the running configuration kept.
.SH EXIT STATUS
0 on success; 1 on an error (the message says what), or when \\fBaudit\\fR or \\fBkeycheck\\fR
found a failure; 2 on a usage error.
.SH SEE ALSO
\\fBpostconf\\fR(5) (smtpd_milters, smtp_tls_policy_maps); in /usr/share/doc/mailward/: the
README, the configuration and metrics references, and why mail is refused.
"""


def roff(text: str) -> str:
    """`text` as roff body text: backslashes and hyphens escaped, no line read as a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in out.splitlines())


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's arguments
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                names += f" \\fI{roff(str(action.metavar or action.dest.upper()))}\\fR"
        else:
            names = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        text = action.help or ""
        if action.choices:
            shown = ", ".join(str(c) or '""' for c in action.choices)
            text = f"{text}: one of {shown}" if text else f"one of {shown}"
        if (action.default not in (None, "", False, [], argparse.SUPPRESS)
                and action.nargs != 0 and "default" not in text):
            text += f" (default: {action.default})"
        lines += [".TP", names, roff(text) if text else ""]
    return [line for line in lines if line != ""]


def man_page(parser: argparse.ArgumentParser, version: str) -> str:
    """mailward(8), from the command line parser: every command, argument and option."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in commands._choices_actions}
    lines = [
        f'.TH MAILWARD 8 "" "mailward {version}" "System Administration"',
        ".SH NAME",
        "mailward \\- policy\\-enforcing mail filter (milter) for Postfix and Sendmail",
        ".SH SYNOPSIS",
        ".B mailward",
        ".I command",
        "[\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        roff(" ".join((parser.description or "").split())),
        ".SH COMMANDS",
    ]
    for name, sub in commands.choices.items():
        usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        lines += [f'.SS "{roff(name)}"', roff(helps.get(name, "")) + ".", ".PP",
                  roff(usage.replace(" [-h]", "")), *_options(sub)]
    return "\n".join(lines) + "\n" + MAN_SECTIONS
