"""The INI configuration, parsed once into frozen, typed objects.

`load(path, registry)` reads the file; the registry of checks comes from whoever builds the
application (cli, app), so this module names no check. Unknown sections and keys are errors
(core/ini.py says how errors name the place); the chain-order rules come from what each check
declares (core/check.py).
"""

from __future__ import annotations

import configparser
import dataclasses
import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mailward.core.check import Link, Registry
from mailward.core.ini import Section
from mailward.core.settings import (
    ERROR_ACTIONS,
    QUARANTINE_HEADER_EXPECTED,
    SUBJECT_TAG_EXPECTED,
    MetricsSettings,
    MilterSettings,
    Mode,
    PolicySettings,
    ReportsSettings,
    StsSettings,
    is_loopback_host,
    is_tcp,
    parse_field_name,
    parse_subject_tag,
)
from mailward.core.verdict import Action, Quarantine
from mailward.errors import ConfigError
from mailward.services.dns import DnsSettings

CORE_SECTIONS = ("milter", "dns", "metrics", "policy", "sts", "reports")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. `chain` holds the enabled checks in `[policy] checks` order."""

    path: str
    milter: MilterSettings
    dns: DnsSettings
    metrics: MetricsSettings
    policy: PolicySettings
    chain: tuple[Link[Any], ...]
    warnings: tuple[str, ...] = field(default=())
    sts: StsSettings = field(default_factory=StsSettings)
    reports: ReportsSettings = field(default_factory=ReportsSettings)


def load(path: str | Path, registry: Registry) -> Config:
    """Read and validate a config file; raise ConfigError naming what is wrong."""
    path = str(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    return from_parser(path, parser, registry)


def loads(text: str, registry: Registry, path: str = "<string>") -> Config:
    """Like `load`, from text (tests, `scan` defaults)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    return from_parser(path, parser, registry)


def from_parser(path: str, parser: configparser.ConfigParser, registry: Registry) -> Config:
    sections = {name: Section(path, name, parser[name]) for name in parser.sections()}
    known = (*CORE_SECTIONS, *registry.section_names())
    for name in sections:
        if name not in known:
            raise ConfigError(f"{path}: [{name}]: unknown section; expected one of "
                              f"{', '.join(sorted(known))}")

    def section(name: str) -> Section:
        return sections.get(name) or Section(path, name, {})

    milter = MilterSettings.load(section("milter"))
    dns = DnsSettings.load(section("dns"))
    metrics = MetricsSettings.load(section("metrics"))
    sts = StsSettings.load(section("sts"))
    reports = ReportsSettings.load(section("reports"))
    psec = section("policy")
    order = psec.words("checks", registry.default_order)
    if not order:
        raise psec.error("checks", "at least one check name (an empty chain checks nothing; "
                         "to turn a check off, set enabled = no in its [check.NAME] section)",
                         "")
    registry.check_order(psec, order)
    policy = PolicySettings(
        checks=order,
        on_error=psec.choice("on_error", Action, Action.TEMPFAIL, ERROR_ACTIONS),
        error_reply=psec.reply("error_reply", str(PolicySettings.error_reply), temporary=True),
        reject_reply=psec.reply("reject_reply", str(PolicySettings.reject_reply),
                                temporary=False),
        tempfail_reply=psec.reply("tempfail_reply", str(PolicySettings.tempfail_reply),
                                  temporary=True),
        quarantine=psec.choice("quarantine", Quarantine, PolicySettings.quarantine),
        quarantine_header=psec.parse("quarantine_header", PolicySettings.quarantine_header,
                                     QUARANTINE_HEADER_EXPECTED, parse_field_name),
        quarantine_subject_tag=psec.parse("quarantine_subject_tag", "", SUBJECT_TAG_EXPECTED,
                                          parse_subject_tag),
    )
    warnings = exposure_warnings(milter, metrics)
    chain: list[Link[Any]] = []
    for check in registry:
        sec = section(f"check.{check.name}")
        enabled = sec.boolean("enabled", True)
        mode = sec.choice("mode", Mode, milter.mode)
        if milter.mode is Mode.MONITOR:
            mode = Mode.MONITOR  # global monitor wins: nothing is enforced
        on_error = sec.choice("on_error", Action, policy.on_error, ERROR_ACTIONS)
        quarantine = sec.choice("quarantine", Quarantine, policy.quarantine)
        settings = check.load(sec)
        sec.finish()
        if f"check.{check.name}" in sections and check.name not in order:
            warnings.append(f"[check.{check.name}] is configured but not in [policy] checks")
        if enabled and check.name in order:
            chain.append(Link(check, settings, mode, on_error, quarantine))
    for s in (section("milter"), section("dns"), section("metrics"), section("sts"),
              section("reports"), psec):
        s.finish()
    chain.sort(key=lambda link: order.index(link.name))
    if not chain:
        warnings.append("[policy] checks: every listed check is disabled (enabled = no): "
                        "mail passes unchecked")
    for link in chain:
        warnings += link.check.config_warnings(link.settings, milter)
    return Config(path, milter, dns, metrics, policy, tuple(chain), tuple(warnings), sts,
                  reports)


def exposure_warnings(milter: MilterSettings, metrics: MetricsSettings) -> list[str]:
    """Listeners that others than the MTA and the local administrator can reach.

    A TCP milter socket, even on loopback, lets any local user speak the milter protocol: have
    messages judged as the MTA would, count against others' rate limits, and get mail signed
    when signing keys are configured. A unix socket is limited by its mode (0660, group
    postfix). Metrics carry no addresses, but a wildcard address publishes them to every
    network the host is on.
    """
    out = []
    if is_tcp(milter.socket):
        host = milter.socket.partition("@")[2]
        where = ("on loopback, so every local user" if is_loopback_host(host)
                 else "beyond loopback, so every host that can reach it")
        out.append(f"[milter] socket {milter.socket} is TCP {where} can connect, speak the "
                   "milter protocol and have mail judged or signed as if it came from the "
                   "MTA; prefer unix:/var/spool/postfix/mailward/milter.sock (mode 0660, "
                   "group postfix)")
    if metrics.listen is not None and ipaddress.ip_address(metrics.listen[0]).is_unspecified:
        host, port = metrics.listen
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.append(f"[metrics] listen {shown} is every address of this host: the metrics "
                   "are exposed beyond loopback; use 127.0.0.1 or ::1 unless a firewall "
                   "protects the port")
    return out


def describe(config: Config) -> str:
    """The effective configuration as INI text (for `mailward check-config`)."""

    def fmt(value: object) -> str:
        if isinstance(value, tuple):
            if len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], str):
                host = f"[{value[0]}]" if ":" in value[0] else value[0]
                return f"{host}:{value[1]}"  # an address with its port
            return ", ".join(fmt(v) for v in value)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, enum.Enum):
            return str(value.value)
        return str(value)

    def block(title: str, obj: object, extra: Mapping[str, object] = MappingProxyType({})) -> str:
        lines = [f"[{title}]"]
        lines += [f"{k} = {fmt(v)}" for k, v in extra.items()]
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            if f.repr:  # fields with repr=False are derived (e.g. a loaded suffix list)
                lines.append(f"{f.name} = {fmt(getattr(obj, f.name))}")
        return "\n".join(lines)

    parts = [block("milter", config.milter), block("dns", config.dns),
             block("metrics", config.metrics),
             block("policy", config.policy), block("sts", config.sts),
             block("reports", config.reports)]
    for link in config.chain:
        parts.append(block(f"check.{link.name}", link.settings,
                           {"enabled": True, "mode": link.mode, "on_error": link.on_error,
                            "quarantine": link.quarantine}))
    return "\n\n".join(parts) + "\n"
