"""The tls, bcc, trace and authres checks, on pure transactions."""

from __future__ import annotations

import pytest

from mailward import pipeline
from mailward.checks import authres
from mailward.config import Config
from mailward.deps import Deps
from mailward.transaction import Direction, Stage, Transaction
from mailward.verdict import (
    Action,
    AddHeader,
    AuthResEntry,
    ChangeHeader,
    CheckResult,
    DeleteHeader,
    Result,
)
from tests.conftest import make_config, make_tx


def run(cfg: Config, name: str, tx: Transaction, results: tuple[CheckResult, ...] = ()
        ) -> CheckResult:
    link = next(li for li in cfg.chain if li.name == name)
    tx = pipeline.run(cfg, tx.stage, tx)[0]  # classify direction as the pipeline does
    return pipeline.run_link(link, tx, Deps(site=cfg.milter, results=results))


# -- tls -------------------------------------------------------------------------------------

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


# -- bcc -------------------------------------------------------------------------------------

def test_bcc_deletes_every_field_highest_index_first() -> None:
    tx = make_tx(headers=[("From", " a@b"), ("Bcc", " x@y"), ("To", " c@d"), ("BCC", " z@y"),
                          ("Resent-Bcc", " r@y"), ("bcc", " w@y")])
    r = run(make_config(), "bcc", tx)
    assert r.result is Result.PASS
    assert r.edits == (DeleteHeader("bcc", 3), DeleteHeader("BCC", 2), DeleteHeader("Bcc", 1),
                       DeleteHeader("Resent-Bcc", 1))


def test_bcc_none() -> None:
    r = run(make_config(), "bcc", make_tx(headers=[("From", " a@b"), ("X-Bcc-Note", " hi")]))
    assert (r.result, r.edits) == (Result.NONE, ())


# -- trace -----------------------------------------------------------------------------------

RECEIVED = [
    ("Received", " from laptop.corp.example (laptop.corp.example [10.1.2.3])\n\tby relay"),
    ("Received", " from ext.example.org (ext.example.org [198.51.100.1]) by mx"),
    ("Received", " from host (unknown [IPv6:fd00::5]) by relay; Mon, 1 Jan 2024 10:30:00"),
    ("Received", " from app.internal.example by relay"),
    ("X-Originating-IP", " [10.1.2.3]"),
    ("X-Mailer", " Foo 1.0"),
]
TRACE_CFG = "[check.trace]\ninternal_hosts = internal.example\n"


def test_trace_removes_internal_hops_on_outbound() -> None:
    r = run(make_config(TRACE_CFG), "trace", make_tx(headers=RECEIVED, auth_user="alice"))
    assert r.result is Result.PASS
    assert set(r.edits) == {DeleteHeader("Received", 1), DeleteHeader("Received", 3),
                            DeleteHeader("Received", 4), DeleteHeader("X-Originating-IP", 1)}


def test_trace_rewrite_keeps_the_rest() -> None:
    cfg = make_config(TRACE_CFG + "action = rewrite\nstrip_headers = X-Originating-IP X-Mailer\n")
    r = run(cfg, "trace", make_tx(headers=RECEIVED, client_ip="10.9.9.9"))
    changes = {e.index: e.value for e in r.edits if isinstance(e, ChangeHeader)}
    assert changes[1] == (" from laptop.corp.example (laptop.corp.example [redacted])\n\tby "
                          "relay")
    assert changes[3] == " from host (unknown [redacted]) by relay; Mon, 1 Jan 2024 10:30:00"
    assert changes[4] == " from redacted.invalid by relay"
    assert DeleteHeader("X-Mailer", 1) in r.edits
    assert 2 not in changes


def test_trace_leaves_inbound_alone() -> None:
    r = run(make_config(TRACE_CFG), "trace", make_tx(headers=RECEIVED))
    assert (r.result, r.edits) == (Result.NONE, ())


# -- authres ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "claimed"), [
    (" mx.example.com; spf=pass", "mx.example.com"),
    (" MX.Example.COM; spf=pass", "mx.example.com"),
    (" mx.example.com", "mx.example.com"),
    (" (forged) mx.example.com 1; none", "mx.example.com"),
    (' "mx.example.com"; dkim=pass', "mx.example.com"),
    ("\n\t mx.example.com.;", "mx.example.com"),
    (" (a (nested) comment)mx.example.com;x", "mx.example.com"),
    (" other.example; spf=pass smtp.mailfrom=mx.example.com", "other.example"),
    ("", ""),
])
def test_authserv_id_of(value: str, claimed: str) -> None:
    assert authres.authserv_id_of(value) == claimed


def test_authres_deletes_ours_highest_first_and_keeps_others() -> None:
    tx = make_tx(headers=[
        ("Authentication-Results", " mx.example.com; spf=pass"),
        ("Authentication-Results", " other.example; dkim=pass"),
        ("authentication-results", " MX.EXAMPLE.COM"),
        ("Authentication-Results", " (c) mx.example.com; garbage ==="),
    ])
    entry = AuthResEntry("x-tls", Result.PASS, properties=(("smtp", "version", "TLSv1.3"),))
    prior = (CheckResult("tls", Result.PASS, authres=(entry,)),)
    r = run(make_config(), "authres", tx, prior)
    assert r.result is Result.PASS
    assert r.edits[:3] == (DeleteHeader("Authentication-Results", 4),
                           DeleteHeader("authentication-results", 3),
                           DeleteHeader("Authentication-Results", 1))
    assert r.edits[3] == AddHeader(
        "Authentication-Results", "mx.example.com;\n\tx-tls=pass smtp.version=TLSv1.3", top=True)


@pytest.mark.parametrize(("value", "rendered"), [
    ("a@b.example\r\nX-Injected: yes; spf=pass", "a@b.exampleX-Injectedyesspfpass"),
    ("x;spf=pass@evil.example", '"x;spf=pass"@evil.example'),
    ('q"uo\\te(d)@evil.example', '"q\\"uo\\\\te(d)"@evil.example'),
    ("plain;dkim=pass", '"plain;dkim=pass"'),
    ("user+tag@example.com", "user+tag@example.com"),
])
def test_authres_values_cannot_inject_results(value: str, rendered: str) -> None:
    entries = (AuthResEntry("x-test", Result.FAIL, reason="bad\r\nX-Evil: 1 from a@b; spf=pass",
                            properties=(("smtp", "mailfrom", value), ("header", "from", " "))),)
    text = authres.render("mx.example.com", entries)
    assert "\r" not in text and "\n" not in text.replace("\n\t", "")
    assert text == ('mx.example.com;\n\tx-test=fail reason="bad X-Evil: 1 from a at b; '
                    f'spf=pass" smtp.mailfrom={rendered}')
    # and what a reader of the field sees is still one result with one property
    import authres as lib
    parsed = lib.AuthenticationResultsHeader.parse_value(text.replace("\n\t", " "))
    assert [r.method for r in parsed.results] == ["x-test"]
    assert len(parsed.results[0].properties) == 1


def test_authres_none_and_directions() -> None:
    r = run(make_config(), "authres", make_tx())
    assert r.result is Result.NONE
    assert r.edits == (AddHeader("Authentication-Results", "mx.example.com; none", top=True),)
    cfg = make_config("[check.authres]\ndirections = inbound\n")
    assert run(cfg, "authres", make_tx(auth_user="bob")).edits == ()


def test_direction_classification() -> None:
    cfg = make_config("[milter]\ntrusted_networks = 10.0.0.0/8\nlocal_domains = example.com\n"
                      "originating_daemons = ORIGINATING\n")
    classify = pipeline.classify
    assert classify(make_tx(), cfg) is Direction.INBOUND
    assert classify(make_tx(client_ip="10.0.0.1"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(client_ip="::ffff:10.0.0.1"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(daemon_name="ORIGINATING"), cfg) is Direction.OUTBOUND
    assert classify(make_tx(auth_user="u", recipients=("a@example.com",)),
                    cfg) is Direction.INTERNAL
    assert classify(make_tx(auth_user="u", recipients=("a@example.com", "b@else.example")),
                    cfg) is Direction.OUTBOUND
    assert classify(make_tx(client_ip=""), cfg) is Direction.INBOUND
