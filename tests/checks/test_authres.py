"""The authres check: forged fields deleted, ours rendered without injection."""

from __future__ import annotations

import authres as lib
import pytest

from mailward.checks import authres
from mailward.core.verdict import (
    AddHeader,
    AuthResEntry,
    CheckResult,
    DeleteHeader,
    Result,
)
from tests.conftest import make_config, make_tx
from tests.conftest import run_check as run


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
    ("a@b.example, c@d.example", '"a@b.example,c"@d.example'),
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
    parsed = lib.AuthenticationResultsHeader.parse_value(text.replace("\n\t", " "))
    assert [r.method for r in parsed.results] == ["x-test"]
    assert len(parsed.results[0].properties) == 1


def test_authres_none_and_directions() -> None:
    r = run(make_config(), "authres", make_tx())
    assert r.result is Result.NONE
    assert r.edits == (AddHeader("Authentication-Results", "mx.example.com; none", top=True),)
    cfg = make_config("[check.authres]\ndirections = inbound\n")
    assert run(cfg, "authres", make_tx(auth_user="bob")).edits == ()


@pytest.mark.parametrize(("value", "rendered"), [
    ("x@banké.example", "smtp.mailfrom=x@xn--bank-epa.example"),
    ("jörg@banké.example", "smtp.mailfrom=xn--bank-epa.example"),  # §2.7.2: the domain alone
    ("x@BANK.example.", "smtp.mailfrom=x@bank.example"),
    ("a@b.example\r\nX-Injected: yes; spf=pass", ""),  # no domain: no property
    ("x@bank..example", ""),
])
def test_authres_names_exactly_the_domain_checked(value: str, rendered: str) -> None:
    """Dropping the é of banké.example would name bank.example: a different domain."""
    text = authres.render("mx.example.com", (AuthResEntry(
        "spf", Result.PASS, properties=(("smtp", "mailfrom", value),
                                        ("header", "d", "bücher.example"),
                                        ("header", "s", "sél"))),))
    expected = " ".join(p for p in ("spf=pass", rendered, "header.d=xn--bcher-kva.example",
                                    "header.s=xn--sl-bja") if p)
    assert text == f"mx.example.com;\n\t{expected}"
