"""The check interface and the registry: order rules derived from declarations, not names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from mailward.checks import REGISTRY
from mailward.core import config, pipeline
from mailward.core.check import EVERY_OTHER, Check, Context, Registry
from mailward.core.ini import Section
from mailward.core.outcomes import SpfOutcome
from mailward.core.snapshot import build
from mailward.core.transaction import Direction, Stage, Transaction
from mailward.core.verdict import Action, AuthResEntry, CheckResult, Reply, Result
from mailward.errors import ConfigError
from tests.conftest import make_tx


@dataclass(frozen=True)
class GreetSettings:
    word: str = "hello"


class Greet(Check[GreetSettings]):
    """A check added by a test alone: no change to the core, config loader or registry code."""

    name = "greet"
    stages = frozenset({Stage.MAIL, Stage.EOM})
    directions = frozenset({Direction.INBOUND})
    requires: ClassVar[tuple[str, ...]] = ("spf",)

    def load(self, sec: Section) -> GreetSettings:
        return GreetSettings(word=sec.string("word", "hello"))

    def run(self, tx: Transaction, ctx: Context, settings: GreetSettings) -> CheckResult:
        spf = ctx.outcome(SpfOutcome)  # typed input from an earlier check
        if tx.stage is Stage.MAIL and settings.word == "no":
            return CheckResult(self.name, Result.FAIL, action=Action.REJECT,
                               reply=Reply(550, "5.7.1", "no"))
        seen = "spf seen" if spf is not None else "no spf"
        return CheckResult(self.name, Result.PASS, reason=seen,
                           authres=(AuthResEntry("x-greet", Result.PASS, reason=settings.word),))


def with_greet() -> Registry:
    checks = list(REGISTRY)
    at = [c.name for c in checks].index("authres")
    return Registry((*checks[:at], Greet(), *checks[at:]))  # before authres


def test_a_new_check_slots_in_with_its_own_module_only() -> None:
    registry = with_greet()
    cfg = config.loads("[milter]\nauthserv_id = mx.example\n"
                       "[policy]\nchecks = spf, dkim, greet, authres\n"
                       "[check.greet]\nword = hi\n", registry)
    snap = build(cfg)
    _, verdict = pipeline.evaluate(Stage.EOM, make_tx(client_ip=None), snap)
    greet = {r.check: r for r in verdict.results}["greet"]
    assert (greet.result, greet.reason) == (Result.PASS, "spf seen")
    header = next(e for e in verdict.edits if getattr(e, "name", "") == "Authentication-Results")
    assert "x-greet=pass reason=hi" in header.value.replace('"', "")  # type: ignore[union-attr]
    # its refusal at MAIL FROM is sent at MAIL FROM
    cfg = config.loads("[policy]\nchecks = spf, greet\n[check.greet]\nword = no\n", registry)
    _, verdict = pipeline.evaluate(Stage.MAIL, make_tx(stage=Stage.MAIL), build(cfg))
    assert str(verdict.reply) == "550 5.7.1 no"
    # outside its directions it is recorded, not run
    _, verdict = pipeline.evaluate(Stage.MAIL, make_tx(stage=Stage.MAIL, auth_user="a"),
                                   build(cfg))
    assert verdict.action is Action.ACCEPT
    assert verdict.results[-1].reason == "outbound: not checked"


def test_the_new_checks_rules_are_enforced_by_the_loader() -> None:
    registry = with_greet()
    with pytest.raises(ConfigError, match="expected spf in the chain, since greet uses"):
        config.loads("[policy]\nchecks = greet\n", registry)
    with pytest.raises(ConfigError, match="expected spf before greet"):
        config.loads("[policy]\nchecks = greet, spf\n", registry)
    with pytest.raises(ConfigError, match=r"\[check.greet\]: unknown section"):
        config.loads("[check.greet]\nword = x\n", REGISTRY)


def test_the_registry_refuses_inconsistent_declarations() -> None:
    checks = list(REGISTRY)
    with pytest.raises(ValueError, match="registered twice"):
        Registry((*checks, checks[0]))

    class Orphan(Greet):
        name = "orphan"
        requires = ("nosuch",)

    with pytest.raises(ValueError, match="unknown checks"):
        Registry((*checks, Orphan()))
    with pytest.raises(ValueError, match="default order breaks a rule"):
        Registry((checks[-1], *checks[:-1]))  # authres first


def test_every_other_means_all_but_those_that_follow_it() -> None:
    class Sealer(Greet):
        name = "sealer"
        requires = ()
        after = ("authres",)

    registry = Registry((*REGISTRY, Sealer()))
    assert registry.order_problem(("tls", "authres", "sealer")) == ""
    assert "before sealer" in registry.order_problem(("sealer", "authres"))
    assert EVERY_OTHER in REGISTRY["authres"].after


def test_default_order_is_the_registry_and_the_reference_config() -> None:
    assert config.loads("", REGISTRY).policy.checks == REGISTRY.default_order
    text = (pytest.importorskip("pathlib").Path(__file__).resolve().parents[2]
            / "conf" / "mailward.ini").read_text()
    line = next(li for li in text.splitlines() if li.startswith("checks = "))
    assert tuple(w.strip() for w in line.removeprefix("checks = ").split(",")) == \
        REGISTRY.default_order


@pytest.mark.parametrize("check", list(REGISTRY), ids=lambda c: c.name)
def test_every_check_declares_itself(check: Check[Any]) -> None:
    assert check.stages and check.stages <= set(Stage) - {Stage.CONNECT, Stage.HELO}
    assert check.directions
    assert set(check.requires) <= set(REGISTRY.default_order)
    module = __import__(type(check).__module__, fromlist=["NAME"])
    assert module.NAME == check.name and module.CHECK is check
