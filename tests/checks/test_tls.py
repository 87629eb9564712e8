"""The tls check: TLS required by direction, recipient domain and version."""

from __future__ import annotations

import pytest

from mailward.core.transaction import Stage
from mailward.core.verdict import (
    Action,
    Result,
)
from tests.conftest import make_config, make_tx
from tests.conftest import run_check as run

TLS_CFG = "[check.tls]\nrequire_domains = secure.example\nmin_version = TLSv1.2\n"


@pytest.mark.parametrize(("version", "rcpt", "result", "action"), [
    ("TLSv1.3", "a@secure.example", Result.PASS, Action.ACCEPT),
    ("TLSv1.2", "a@secure.example", Result.PASS, Action.ACCEPT),
    ("TLSv1.1", "a@secure.example", Result.FAIL, Action.REJECT),
    ("", "a@secure.example", Result.FAIL, Action.REJECT),
    ("", "a@SECURE.example", Result.FAIL, Action.REJECT),
    ("", "a@other.example", Result.NONE, Action.ACCEPT),
    ("TLSv1", "a@other.example", Result.NEUTRAL, Action.ACCEPT),
])
def test_tls_per_recipient_domain(version: str, rcpt: str, result: Result,
                                  action: Action) -> None:
    cfg = make_config(TLS_CFG)
    r = run(cfg, "tls", make_tx(stage=Stage.RCPT, tls=version, recipients=(rcpt,)))
    assert (r.result, r.action) == (result, action)
    if action is Action.REJECT:
        assert r.reply is not None and r.reply.code == 530 and r.reply.status == "5.7.0"


def test_tls_domain_requirement_is_not_decided_at_mail() -> None:
    r = run(make_config(TLS_CFG), "tls", make_tx(stage=Stage.MAIL))
    assert r.action is Action.ACCEPT


def test_tls_require_inbound_refuses_at_mail() -> None:
    cfg = make_config("[check.tls]\nrequire_inbound = yes\n")
    r = run(cfg, "tls", make_tx(stage=Stage.MAIL))
    assert (r.result, r.action, str(r.reply)) == (
        Result.FAIL, Action.REJECT, "530 5.7.0 Must issue a STARTTLS command first")
    # trusted (outbound) clients are judged by require_outbound instead
    r = run(cfg, "tls", make_tx(stage=Stage.MAIL, client_ip="10.1.1.1"))
    assert r.action is Action.ACCEPT


def test_tls_exempt_networks_and_directions() -> None:
    cfg = make_config("[milter]\nauthserv_id = mx.example.com\ntrusted_networks = 10.0.0.0/8\n"
                      "local_domains = example.com\n"
                      "[check.tls]\nrequire_inbound = yes\nexempt_networks = 198.51.100.0/24\n"
                      "require_outbound = yes\n")
    assert run(cfg, "tls", make_tx(stage=Stage.RCPT, client_ip="198.51.100.7",
                                   recipients=("a@x.example",))).action is Action.ACCEPT
    outbound = make_tx(stage=Stage.RCPT, auth_user="alice", recipients=("a@x.example",))
    assert run(cfg, "tls", outbound).action is Action.REJECT
    internal = make_tx(stage=Stage.RCPT, auth_user="alice", recipients=("b@example.com",))
    assert run(cfg, "tls", internal).action is Action.ACCEPT  # require_internal = no


def test_tls_version_action_and_report() -> None:
    cfg = make_config("[check.tls]\nrequire_domains = s.example\nmin_version = TLSv1.3\n"
                      "version_action = quarantine\n")
    r = run(cfg, "tls", make_tx(tls="TLSv1.2", recipients=("a@s.example",)))
    assert (r.result, r.action) == (Result.FAIL, Action.QUARANTINE)
    assert r.authres[0].method == "x-tls"
    assert ("smtp", "version", "TLSv1.2") in r.authres[0].properties
