"""The sender check: ownership of sender addresses, own-domain spoofing, the relay guard."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailward.core import policy
from mailward.core.transaction import Stage
from mailward.core.verdict import Action, Result
from mailward.errors import ConfigError
from tests.conftest import loads, make_config, make_tx, run_stage

MAP = """# who may send as what
alice@example.com: alice@example.com, alice.smith@example.com
bob: bob@example.com, @sales.example.com
"""


@pytest.fixture
def cfg_text(tmp_path: Path) -> str:
    (tmp_path / "senders").write_text(MAP)
    return ("[milter]\nauthserv_id = mx.example.com\ntrusted_networks = 10.0.0.0/8\n"
            "local_domains = example.com, sales.example.com\n"
            f"[policy]\nchecks = sender\n[check.sender]\nmap_file = {tmp_path}/senders\n")


def run(text: str, stage: Stage, **tx: object) -> tuple[Result, Action, str]:
    cfg = make_config(text)
    _, (r,) = run_stage(cfg, stage, make_tx(stage=stage, **tx))  # type: ignore[arg-type]
    v = policy.decide((r,), cfg.policy, final=stage is Stage.EOM)
    return r.result, v.action, str(v.reply) if v.reply else ""


MISMATCH = "553 5.7.1 Sender address not owned by authenticated user"


@pytest.mark.parametrize(("user", "mail_from", "result"), [
    ("alice@example.com", "alice@example.com", Result.PASS),
    ("alice@example.com", "Alice.Smith@EXAMPLE.com", Result.PASS),
    ("alice@example.com", "bob@example.com", Result.FAIL),
    ("bob", "bob@example.com", Result.PASS),
    ("bob", "anyone@sales.example.com", Result.PASS),
    ("bob", "anyone@evil-sales.example.com", Result.FAIL),
    ("carol@example.com", "carol@example.com", Result.PASS),  # no entry: the login itself
    ("carol@example.com", "ceo@example.com", Result.FAIL),
    ("carol", "carol@example.com", Result.FAIL),  # a login that is no address owns nothing
    ("alice@example.com", "", Result.NONE),  # bounces are fine
])
def test_mail_from_ownership(cfg_text: str, user: str, mail_from: str, result: Result) -> None:
    got = run(cfg_text, Stage.MAIL, auth_user=user, mail_from=mail_from)
    assert got[0] is result
    if result is Result.FAIL:
        assert got[1:] == (Action.REJECT, MISMATCH)


def test_from_header_ownership(cfg_text: str) -> None:
    ok = run(cfg_text, Stage.EOM, auth_user="bob", headers=[("From", " Bob <bob@example.com>")])
    assert ok[0] is Result.PASS
    bad = run(cfg_text, Stage.EOM, auth_user="bob",
              headers=[("From", ' "bob@example.com" <ceo@example.com>')])
    assert bad == (Result.FAIL, Action.REJECT, MISMATCH)
    two = run(cfg_text, Stage.EOM, auth_user="bob",
              headers=[("From", " bob@example.com, ceo@example.com")])
    assert two[0] is Result.FAIL


def test_from_without_an_address(cfg_text: str) -> None:
    got = run(cfg_text, Stage.EOM, auth_user="bob", headers=[("From", " bob")])
    assert got == (Result.FAIL, Action.REJECT, MISMATCH)
    # no From at all: the MTA adds one from the (already checked) envelope
    assert run(cfg_text, Stage.EOM, auth_user="bob")[0] is Result.NONE


def test_monitor_mode(cfg_text: str) -> None:
    got = run(cfg_text + "mode = monitor\n", Stage.MAIL, auth_user="bob",
              mail_from="ceo@example.com")
    assert got == (Result.FAIL, Action.ACCEPT, "")


def test_own_domain_from_outside(cfg_text: str) -> None:
    got = run(cfg_text, Stage.MAIL, mail_from="ceo@example.com")
    assert got == (Result.FAIL, Action.REJECT, "550 5.7.1 Our domain may only be used by our users")
    assert run(cfg_text, Stage.MAIL, mail_from="x@other.example")[0] is Result.NONE
    assert run(cfg_text, Stage.MAIL, mail_from="ceo@example.com", client_ip="10.1.1.1")[0] \
        is Result.NONE  # trusted network
    header = run(cfg_text, Stage.EOM, headers=[("From", " ceo@example.com")])
    assert header[:2] == (Result.FAIL, Action.ACCEPT)  # lists keep From: default accept
    strict = run(cfg_text + "own_domain_header_action = reject\n", Stage.EOM,
                 headers=[("From", " ceo@example.com")])
    assert strict[1] is Action.REJECT


def test_relay_guard(cfg_text: str) -> None:
    refused = run(cfg_text, Stage.RCPT, recipients=("x@elsewhere.example",))
    assert refused == (Result.FAIL, Action.REJECT, "554 5.7.1 Relay access denied")
    assert run(cfg_text, Stage.RCPT, recipients=("x@example.com",))[0] is Result.PASS
    assert run(cfg_text, Stage.RCPT, recipients=("x@elsewhere.example",),
               auth_user="bob")[1] is Action.ACCEPT
    assert run(cfg_text, Stage.RCPT, recipients=("x@elsewhere.example",),
               client_ip="10.2.3.4")[1] is Action.ACCEPT
    off = run(cfg_text + "relay_guard = no\n", Stage.RCPT, recipients=("x@elsewhere.example",))
    assert off[1] is Action.ACCEPT


def test_without_local_domains_the_guard_is_off_and_check_config_warns() -> None:
    cfg = loads("[policy]\nchecks = sender\n")
    assert any("local_domains is empty" in w for w in cfg.warnings)
    assert run("[policy]\nchecks = sender\n", Stage.RCPT,
               recipients=("x@elsewhere.example",))[1] is Action.ACCEPT


def test_bad_map_file(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("alice@example.com alice@example.com\n")
    with pytest.raises(ConfigError) as err:
        loads(f"[check.sender]\nmap_file = {tmp_path}/bad\n", "t.ini")
    assert f"{tmp_path}/bad:1: expected 'login: address, @domain, ...'" in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        loads(f"[check.sender]\nmap_file = {tmp_path}/missing\n", "t.ini")


def test_ten_thousand_recipients_are_cheap(cfg_text: str) -> None:
    cfg = make_config(cfg_text)
    start = time.monotonic()
    accepted: tuple[str, ...] = ()
    for i in range(10_000):
        candidate = (*accepted, f"u{i}@example.com")
        _, (r,) = run_stage(cfg, Stage.RCPT, make_tx(stage=Stage.RCPT, recipients=candidate))
        if r.action is Action.ACCEPT:
            accepted = candidate
    assert len(accepted) == 10_000
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("from_", [
    "boss@ example.com, alice@example.com",  # CFWS after @: still boss@example.com
    "boss@(x)example.com",
    "Alice <alice@example.com>, boss @ example .com",
    "alice@example.com <boss@example.com>",  # unreadable: not alice's
    "alice@example.com, (unterminated",
])
def test_a_from_the_user_does_not_own_in_any_syntax_is_refused(cfg_text: str,
                                                               from_: str) -> None:
    got = run(cfg_text, Stage.EOM, auth_user="alice@example.com",
              headers=[("From", " " + from_)])
    assert got == (Result.FAIL, Action.REJECT, MISMATCH)


def test_outside_use_of_our_domain_in_any_syntax_is_seen(cfg_text: str) -> None:
    text = cfg_text.replace("[check.sender]", "[check.sender]\nown_domain_header_action = reject")
    got = run(text, Stage.EOM, headers=[("From", " ceo@ example.com")])
    assert got[:2] == (Result.FAIL, Action.REJECT)
