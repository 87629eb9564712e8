"""ARC sealing (RFC 8617 §5.1): what is sealed, what it says, that dkimpy and our own `arc`
check verify it, the public signing suite through the check, and bounded memory.

The signing suite (tests/data/arc/arc-draft-sign-tests.yml): every case passes, compared
field by field (white space aside, as the suite's harness does) with the AAR, AMS and AS it
gives; the suite's fixed t= and standardized form are set on the check's settings (not INI
keys). A case with an empty AS/AMS/AAR expects no seal.
"""

from __future__ import annotations

import dataclasses
import os
import tracemalloc
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
import yaml

from mailward.checks import arc as arc_check
from mailward.core import arcsets, config, policy
from mailward.core.outcomes import ArcOutcome
from mailward.core.transaction import Body, Stage
from mailward.core.verdict import AddHeader, CheckResult, Result, apply_edits
from mailward.errors import ConfigError
from mailward.lab.dns import Nameserver
from mailward.scan import parse_message
from mailward.services import keys
from mailward.services.dns import Budget, DnsSettings, Resolver
from tests.checks.test_arc import MESSAGE, publish_records, seal
from tests.checks.test_dkim import publish, rsa_key
from tests.conftest import make_config, make_tx, run_stage

VECTORS = Path(__file__).resolve().parents[1] / "data" / "arc"
SOURCE = "[milter]\nauthserv_id = {authserv_id}\n"


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("arckeys")
    keys.generate(domain="lab.example", selector="arc1", bits=2048, directory=str(d))
    return d


@pytest.fixture
def resolver(nameserver: Nameserver, keydir: Path) -> Resolver:
    key = keys.load_key(str(keydir / "lab.example.arc1.key"), domain="lab.example",
                        selector="arc1")
    nameserver.load_zone(keys.zone_line(key))
    public = rsa_key(2048)[1]
    for selector, domain in (("s1", "lists.example"), ("s2", "fwd.example")):
        publish(nameserver, f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={public}")
    return Resolver(DnsSettings(nameservers=(("127.0.0.1", nameserver.port),), timeout=0.5,
                                lifetime=1))


def seal_config(keydir: Path, extra: str = "", chain: str = "tls, bcc, trace, authres, arc_seal",
                authserv_id: str = "mx.lab.example") -> config.Config:
    return make_config(
        f"[milter]\nauthserv_id = {authserv_id}\ntrusted_networks = 10.0.0.0/8\n"
        f"[policy]\nchecks = {chain}\n"
        f"[check.arc_seal]\nkey = lab.example arc1 {keydir}/lab.example.arc1.key\n"
        + ("" if "daemons" in extra else "daemons = ORIGINATING\n") + extra)


def leave(cfg: config.Config, raw: bytes, **tx: Any) -> tuple[bytes, CheckResult]:
    """Run the chain on `raw` as it comes back from a list server on the ORIGINATING service;
    the message as it would leave, and arc_seal's result."""
    headers, body = parse_message(raw)
    spool = Body(threshold=1 << 20)
    spool.write(body.replace(b"\n", b"\r\n"))
    tx.setdefault("daemon_name", "ORIGINATING")
    t = make_tx(headers=headers, body=spool, recipients=("bob@example.net",), **tx)
    try:
        t, results = run_stage(cfg, Stage.EOM, t)
    finally:
        spool.close()
    out = apply_edits(t.headers, policy.decide(results, cfg.policy).edits)
    message = b"".join(n.encode() + b":" + v.replace("\n", "\r\n").encode() + b"\r\n"
                       for n, v in out) + b"\r\n" + body.replace(b"\n", b"\r\n")
    return message, next(r for r in results if r.check == "arc_seal")


def verified_by_us(message: bytes, resolver: Resolver) -> ArcOutcome:
    headers, body = parse_message(message)
    spool = Body(threshold=1 << 20)
    spool.write(body.replace(b"\n", b"\r\n"))
    try:
        return arc_check.validate(make_tx(headers=headers, body=spool),
                                  resolver.bind(Budget(30)), ("lab.example",))
    finally:
        spool.close()


def dkimpy_verify(message: bytes, resolver: Resolver) -> bytes | None:
    cv, _, _ = dkimpy.arc_verify(message, dnsfunc=lambda name, timeout=5: resolver.bind(
        Budget(30)).dkim_txt(name))
    return cv  # type: ignore[no-any-return]


INBOUND_AR = (b"Authentication-Results: mx.lab.example;\r\n\tspf=pass "
              b"smtp.mailfrom=alice@bank.example;\r\n\tdkim=none;\r\n\tarc=none;\r\n"
              b"\tdmarc=pass header.from=bank.example policy.dmarc=reject\r\n")


def test_a_resubmitted_message_is_sealed_over_our_results(keydir: Path,
                                                          resolver: Resolver) -> None:
    """The list server sends back what our inbound hop delivered to it, changed: the seal
    carries that hop's results (and this hop's), verifies with dkimpy and with our check."""
    raw = INBOUND_AR + MESSAGE.replace(b"Subject: a post", b"Subject: [list] a post")
    message, r = leave(seal_config(keydir), raw, tls="TLSv1.3")
    assert (r.result, r.reason) == (Result.PASS, "sealed i=1 cv=none d=lab.example s=arc1")
    headers = parse_message(message)[0]
    assert [n for n, _ in headers[:4]] == ["ARC-Seal", "ARC-Message-Signature",
                                            "ARC-Authentication-Results",
                                            "Authentication-Results"]
    aar = dict(headers)["ARC-Authentication-Results"]
    assert aar.replace("\n\t", " ") == (
        " i=1; mx.lab.example; x-tls=pass smtp.version=TLSv1.3 "
        "smtp.cipher=TLS_AES_256_GCM_SHA384 smtp.bits=256; spf=pass "
        "smtp.mailfrom=alice@bank.example; dkim=none; arc=none; dmarc=pass "
        "header.from=bank.example policy.dmarc=reject")
    assert "cv=none" in dict(headers)["ARC-Seal"]
    assert dkimpy_verify(message, resolver) == dkimpy.CV_Pass
    ours = verified_by_us(message, resolver)
    assert (ours.result, ours.instances, ours.sealers) == (Result.PASS, 1, ("lab.example",))
    assert ours.vouches[0].dmarc_pass == ("bank.example",)  # what a next hop may trust


def test_an_existing_chain_is_sealed_on_with_the_cv_we_found(keydir: Path,
                                                             resolver: Resolver) -> None:
    upstream = seal(MESSAGE)  # lists.example, i=1
    ar = INBOUND_AR.replace(b"arc=none", b"arc=pass (i=1) smtp.remote-ip=192.0.2.1 "
                                          b"header.oldest-pass=0")
    changed = (ar + upstream).replace(b"Hello list.", b"Hello list.\r\n-- \r\nfooter")
    message, r = leave(seal_config(keydir), changed)
    assert r.reason == "sealed i=2 cv=pass d=lab.example s=arc1"
    assert dkimpy_verify(message, resolver) == dkimpy.CV_Pass
    ours = verified_by_us(message, resolver)
    assert (ours.result, ours.instances, ours.oldest_pass) == (Result.PASS, 2, 2)


def test_a_failed_chain_is_sealed_as_failed_over_our_set_only(keydir: Path,
                                                              resolver: Resolver) -> None:
    upstream = seal(MESSAGE)
    ar = INBOUND_AR.replace(b"arc=none", b'arc=fail reason="body hash mismatch"')
    message, r = leave(seal_config(keydir), ar + upstream)
    assert r.reason == "sealed i=2 cv=fail d=lab.example s=arc1"
    assert dkimpy_verify(message, resolver) is None  # dkimpy: the chain ended with a fail
    ours = verified_by_us(message, resolver)
    assert (ours.result, ours.reason) == (
        Result.FAIL, "ARC-Seal i=2 says cv=fail: an earlier hop found the chain broken")
    # our seal is over our set alone (RFC 8617 §5.1.2): it verifies
    tx = make_tx(headers=parse_message(message)[0])
    verifier = arc_check.Verifier(tx, arcsets.read_sets(tx.headers), resolver.bind(Budget(30)))
    verifier.seal_message.headers = verifier.all_seal_headers[1:3]
    sig = {**verifier.sets[2].tags["ARC-Seal"], b"c": b"relaxed/relaxed"}
    record = resolver.bind(Budget(30)).dkim_txt("arc1._domainkey.lab.example")
    assert record is not None
    assert verifier.seal_message.verify_sig(
        sig, [b"arc-authentication-results", b"arc-message-signature"],
        arc_check._parsed(verifier.sets[2].fields["ARC-Seal"]), lambda *_a, **_k: record)


@pytest.mark.parametrize(("raw", "tx", "reason"), [
    (INBOUND_AR + MESSAGE, {"daemon_name": "", "auth_user": "alice"},
     "not from a sealing source"),
    (INBOUND_AR + MESSAGE, {"daemon_name": ""}, "inbound: not checked"),
    (INBOUND_AR.replace(b"\tarc=none;\r\n", b"") + seal(MESSAGE), {},
     "the message has ARC fields and no arc= result of ours: never validated here"),
])
def test_what_is_not_sealed(keydir: Path, resolver: Resolver, raw: bytes, tx: dict[str, Any],
                            reason: str) -> None:
    message, r = leave(seal_config(keydir), raw, **tx)
    assert (r.result, r.reason) == (Result.NONE, reason)
    assert message.count(b"ARC-Seal:") == raw.count(b"ARC-Seal:")


def test_no_key_seals_nothing() -> None:
    r = leave(make_config("[policy]\nchecks = arc_seal\n[check.arc_seal]\n"
                          "daemons = ORIGINATING\n"), MESSAGE,
              auth_user="alice")[1]
    assert (r.result, r.reason) == (Result.NONE, "no key: nothing is sealed")


def test_only_our_own_results_are_copied(keydir: Path, resolver: Resolver) -> None:
    """Results of other authserv-ids, and results we could not have written, stay out."""
    raw = (b"Authentication-Results: other.example; dmarc=pass header.from=bank.example\r\n"
           b"Authentication-Results: mx.lab.example; dkim=pass (\xc3\xa9) header.d=x.example;"
           b" spf=pass smtp.mailfrom=a@bank.example\r\n" + MESSAGE)
    message, _ = leave(seal_config(keydir, chain="arc_seal"), raw)
    aar = dict(parse_message(message)[0])["ARC-Authentication-Results"]
    assert aar.replace("\n\t", " ") == " i=1; mx.lab.example; spf=pass smtp.mailfrom=a@bank.example"


def test_fifty_sets_are_the_most(keydir: Path, resolver: Resolver) -> None:
    raw = MESSAGE
    for i in range(1, 51):
        raw = seal(raw, cv="none" if i == 1 else "pass", t=1_700_000_000)
    ar = INBOUND_AR.replace(b"arc=none", b"arc=pass")
    r = leave(seal_config(keydir), ar + raw)[1]
    assert (r.result, r.reason) == (Result.NONE, "the chain has 50 sets (RFC 8617 §4.2.1)")


def test_a_large_body_is_sealed_in_bounded_memory(keydir: Path, resolver: Resolver) -> None:
    body = b"".join(b"line %d of a large attachment, base64-ish ABCDEFGHIJKLMNOP\r\n" % i
                    for i in range(330_000))
    headers, _ = parse_message(INBOUND_AR + MESSAGE)
    spool = Body(threshold=1 << 20)
    spool.write(body)
    tx = make_tx(headers=headers, body=spool, daemon_name="ORIGINATING",
                 recipients=("bob@example.net",))
    cfg = seal_config(keydir, chain="arc_seal")
    tracemalloc.start()
    try:
        _, (r,) = run_stage(cfg, Stage.EOM, tx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        spool.close()
    assert spool.size > 20_000_000 and r.result is Result.PASS, r.reason
    assert peak < 4_000_000, f"peak {peak} bytes while sealing a {spool.size}-byte body"
    message = b"".join(f"{e.name}: {e.value}\r\n".replace("\n\t", "\r\n\t").encode()
                       for e in reversed(r.edits) if isinstance(e, AddHeader))
    assert dkimpy_verify(message + INBOUND_AR + MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
                         + body, resolver) == dkimpy.CV_Pass


# -- configuration -----------------------------------------------------------------------------

def test_the_key_is_checked_like_a_dkim_key(keydir: Path, tmp_path: Path) -> None:
    ed = keys.generate(domain="lab.example", selector="ed", kind="ed25519",
                       directory=str(tmp_path))
    with pytest.raises(ConfigError, match="an RSA key"):
        make_config(f"[check.arc_seal]\nkey = lab.example ed {ed.path}\n")
    loose = tmp_path / "loose.key"
    loose.write_bytes((keydir / "lab.example.arc1.key").read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        make_config(f"[check.arc_seal]\nkey = lab.example arc1 {loose}\n")
    with pytest.raises(ConfigError, match="domain selector"):
        make_config("[check.arc_seal]\nkey = lab.example\n")
    with pytest.raises(ConfigError, match="includes From and not ARC-Seal"):
        make_config("[check.arc_seal]\nheaders = To, Subject\n")
    cfg = seal_config(keydir)
    assert "BEGIN" not in config.describe(cfg) and "PRIVATE" not in repr(cfg)


def test_sources_that_are_not_ours_are_warned_about(keydir: Path) -> None:
    cfg = seal_config(keydir, "networks = 10.1.0.0/16, 192.0.2.0/24\ndaemons = LISTS\n")
    assert [w for w in cfg.warnings if "arc_seal" in w] == [
        "[check.arc_seal] networks 192.0.2.0/24 is not within [milter] trusted_networks: its "
        "mail is judged as inbound and never sealed",
        "[check.arc_seal] daemons LISTS is not in [milter] originating_daemons: its mail is "
        "judged as inbound and never sealed"]


def test_it_must_run_after_authres(keydir: Path) -> None:
    with pytest.raises(ConfigError, match="authres before arc_seal"):
        seal_config(keydir, chain="arc_seal, authres")


def test_an_unpublished_key_is_warned_about(keydir: Path, nameserver: Nameserver) -> None:
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", nameserver.port),)))
    link = next(li for li in seal_config(keydir).chain if li.name == "arc_seal")
    assert link.setup_warnings(resolver) == [
        f"arc_seal: the key {keydir}/lab.example.arc1.key does not match the record at "
        "arc1._domainkey.lab.example (none); seals will not verify"]


# -- the public signing suite ------------------------------------------------------------------

def sign_cases() -> list[Any]:
    with open(VECTORS / "arc-draft-sign-tests.yml", encoding="utf-8") as fh:
        scenarios = list(yaml.safe_load_all(fh))
    return [pytest.param(case, scenario, id=name) for scenario in scenarios
            for name, case in scenario["tests"].items()]


@pytest.mark.parametrize(("case", "scenario"), sign_cases())
def test_signing_suite(case: dict[str, Any], scenario: dict[str, Any], tmp_path: Path,
                       nameserver: Nameserver) -> None:
    key = tmp_path / "suite.key"
    key.write_text(scenario["privatekey"])
    key.chmod(0o600)
    publish_records(nameserver, scenario["txt-records"])
    cfg = make_config(
        f"[milter]\nauthserv_id = {case['srv-id']}\n[policy]\nchecks = arc_seal\n"
        f"[check.arc_seal]\nkey = {scenario['domain']} {scenario['sel']} {key}\n"
        f"daemons = ORIGINATING\nheaders = {case['sig-headers'].replace(':', ', ')}\n")
    link = cfg.chain[0]
    suite = dataclasses.replace(link.settings, timestamp=int(case["t"]), standardize=True)
    cfg = dataclasses.replace(cfg, chain=(dataclasses.replace(link, settings=suite),))
    r = leave(cfg, case["message"].encode())[1]
    got = {e.name: "".join(e.value.split()) for e in r.edits if isinstance(e, AddHeader)}
    expected = {name: "".join((case[tag] or "").split()) for name, tag in (
        ("ARC-Seal", "AS"), ("ARC-Message-Signature", "AMS"),
        ("ARC-Authentication-Results", "AAR"))}
    if not any(expected.values()):
        assert (r.result, got) == (Result.NONE, {}), r.reason
        return
    assert r.result is Result.PASS, r.reason
    assert got == expected
