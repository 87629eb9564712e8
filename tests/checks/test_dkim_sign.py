"""DKIM signing: keys, keygen, what is signed, and verification against the published record."""

from __future__ import annotations

import logging
import os
import stat
import tracemalloc
from pathlib import Path

import dkim as dkimpy
import pytest

from mailward.app import App
from mailward.cli import main
from mailward.core import config, policy
from mailward.core.transaction import Body, Stage
from mailward.core.verdict import Result, apply_edits
from mailward.errors import ConfigError
from mailward.lab.dns import Nameserver
from mailward.scan import parse_message
from mailward.services import keys
from mailward.services.dns import Budget, DnsSettings, Resolver
from tests.conftest import loads, make_config, make_tx, run_stage

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
           b"Bcc: secret@example.org\r\n"
           b"Received: from laptop.corp.example (laptop [10.1.2.3]) by relay\r\n"
           b"X-Originating-IP: [10.1.2.3]\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob.\r\n")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    keys.generate(domain="example.com", selector="rsa", bits=2048, directory=str(d))
    keys.generate(domain="example.com", selector="ed", kind="ed25519", directory=str(d))
    return d


@pytest.fixture
def resolver(nameserver: Nameserver, keydir: Path) -> Resolver:
    for selector in ("rsa", "ed"):
        key = keys.load_key(str(keydir / f"example.com.{selector}.key"), domain="example.com",
                            selector=selector)
        nameserver.load_zone(keys.zone_line(key))
    return Resolver(DnsSettings(nameservers=(("127.0.0.1", nameserver.port),)))


def sign_config(keydir: Path, extra: str = "") -> config.Config:
    return make_config(
        "[policy]\nchecks = bcc, trace, dkim_sign, authres\n[check.dkim_sign]\nkeys =\n"
        f"    example.com rsa {keydir}/example.com.rsa.key\n"
        f"    example.com ed {keydir}/example.com.ed.key\n" + extra)


def leave(cfg: config.Config, raw: bytes, **tx: object) -> tuple[bytes, Result]:
    """Run the chain and return the message as it would leave, and dkim_sign's result."""
    headers, body = parse_message(raw)
    spool = Body(threshold=1 << 20)
    spool.write(body.replace(b"\n", b"\r\n"))
    t = make_tx(headers=headers, body=spool, **tx)  # type: ignore[arg-type]
    t, results = run_stage(cfg, Stage.EOM, t)
    verdict = policy.decide(results, cfg.policy)
    out = apply_edits(t.headers, verdict.edits)
    message = b"".join(n.encode() + b":" + v.replace("\n", "\r\n").encode() + b"\r\n"
                       for n, v in out) + b"\r\n" + body.replace(b"\n", b"\r\n")
    spool.close()
    return message, next(r.result for r in results if r.check == "dkim_sign")


def verify_all(message: bytes, resolver: Resolver) -> list[bool]:
    d = dkimpy.DKIM(message)
    count = sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")
    def one(i: int) -> bool:
        try:
            return bool(d.verify(idx=i, dnsfunc=resolver.bind(Budget(30)).dkim_txt))
        except dkimpy.ValidationError:  # e.g. a body hash mismatch dkimpy raises, not returns
            return False

    return [one(i) for i in range(count)]


def test_outbound_is_dual_signed_over_what_leaves(keydir: Path, resolver: Resolver) -> None:
    message, result = leave(sign_config(keydir), MESSAGE, auth_user="alice")
    assert result is Result.PASS
    assert b"Bcc:" not in message and b"10.1.2.3" not in message
    assert verify_all(message, resolver) == [True, True]
    sigs = [v for n, v in parse_message(message)[0] if n == "DKIM-Signature"]
    assert {"a=rsa-sha256" in s or "a=ed25519-sha256" in s for s in sigs} == {True}
    h = dkimpy.util.parse_tag_value(sigs[0].encode())[b"h"].replace(b" ", b"").split(b":")
    assert h.count(b"from") == 2 and h.count(b"subject") == 2 and h.count(b"cc") == 1
    # over-signing: a From added on the way does not ride on the signature
    forged = message.replace(b"From: Alice", b"From: mallory@evil.example\r\nFrom: Alice", 1)
    assert verify_all(forged, resolver) == [False, False]


def test_what_is_not_signed(keydir: Path, resolver: Resolver) -> None:
    cfg = sign_config(keydir)
    assert leave(cfg, MESSAGE)[1] is Result.NONE  # inbound
    other = MESSAGE.replace(b"alice@example.com", b"alice@other.example")
    message, result = leave(cfg, other, auth_user="alice")
    assert result is Result.NONE and b"DKIM-Signature" not in message  # no key: never signed
    two = MESSAGE.replace(b"To: bob", b"From: x@example.com\r\nTo: bob")
    assert leave(cfg, two, auth_user="alice")[1] is Result.NONE


def test_domain_map(keydir: Path, resolver: Resolver) -> None:
    cfg = sign_config(keydir, "domain_map = news.example.com:example.com\n")
    sub = MESSAGE.replace(b"alice@example.com", b"alice@news.example.com")
    message, result = leave(cfg, sub, auth_user="alice")
    assert result is Result.PASS and verify_all(message, resolver) == [True, True]
    assert b"d=example.com" in message


def test_our_verifier_agrees(keydir: Path, resolver: Resolver, nameserver: Nameserver) -> None:
    message, _ = leave(sign_config(keydir), MESSAGE, auth_user="alice")
    headers, body = parse_message(message)
    spool = Body(threshold=1 << 20)
    spool.write(body.replace(b"\n", b"\r\n"))
    cfg = make_config("[policy]\nchecks = dkim\n")
    _, (r,) = run_stage(cfg, Stage.EOM, make_tx(headers=headers, body=spool),
                           resolver=resolver)
    spool.close()
    assert [str(e.result) for e in r.authres] == ["pass", "pass"]


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple",
                                   "simple/relaxed"])
@pytest.mark.parametrize("body", [
    b"", b"\r\n\r\n", b"no final line end", b"trailing  \t \r\n\r\n\r\n",
    b"a\tb  c \r\n \r\n\r\nd\r\n", b"x" * 70_000 + b" \r\n" * 3, b"\r\n" * 40_000 + b"z"],
    # short ids: pytest puts the id in PYTEST_CURRENT_TEST, and an 80 KB environment
    # variable makes exec fail (E2BIG) for the subprocesses the fixtures start
    ids=["empty", "blank-lines", "no-final-eol", "trailing-blanks", "mixed", "long-line",
         "many-blank-lines"])
def test_the_streamed_body_hash_signs_what_dkimpy_verifies(
        keydir: Path, resolver: Resolver, canon: str, body: bytes) -> None:
    """The body hash is ours (from the spool), the verifier dkimpy's over the whole message:
    every canonicalization and the bodies where they differ (empty, trailing blank lines and
    white space, no final CRLF, past a spool chunk)."""
    headers = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    message, result = leave(sign_config(keydir, f"canonicalization = {canon}\n"),
                            headers + body, auth_user="alice")
    assert result is Result.PASS and f"c={canon}".encode() in message
    assert verify_all(message, resolver) == [True, True]
    assert verify_all(message + b"tampered\r\n", resolver) == [False, False]


def test_a_large_body_is_signed_in_bounded_memory(keydir: Path, resolver: Resolver) -> None:
    """Signing reads the body from the spool a chunk at a time: 20 MB costs no 20 MB copy
    (dkimpy's own sign() holds the message several times over)."""
    line = b"line of a large attachment, base64-ish ABCDEFGHIJKLMNOPQRSTUVWXYZ012345\r\n"
    headers, _ = parse_message(MESSAGE)
    spool = Body(threshold=1 << 20)
    for _ in range(280_000):
        spool.write(line)
    cfg = sign_config(keydir)
    tx = make_tx(headers=headers, body=spool, auth_user="alice")
    tracemalloc.start()
    try:
        t, results = run_stage(cfg, Stage.EOM, tx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    signed = next(r for r in results if r.check == "dkim_sign")
    out = apply_edits(t.headers, policy.decide(results, cfg.policy).edits)
    message = b"".join(n.encode() + b":" + v.replace("\n", "\r\n").encode() + b"\r\n"
                       for n, v in out) + b"\r\n" + b"".join(spool.chunks())
    spool.close()
    assert spool.size > 20_000_000 and signed.result is Result.PASS
    assert peak < 4_000_000, f"peak {peak} bytes while signing a {spool.size}-byte body"
    assert verify_all(message, resolver) == [True, True]


@pytest.mark.parametrize(("setup", "expected"), [
    ("missing", "cannot read key file: No such file or directory"),
    ("world", "key file is readable by others (mode 644)"),
    ("group", "key file is writable by its group (mode 620)"),
    ("garbage", "neither an RSA PEM key nor a base64 ed25519 seed"),
    ("badpem", "not a usable RSA private key (PEM)"),
])
def test_key_file_problems_refuse_the_config(tmp_path: Path, keydir: Path, setup: str,
                                             expected: str) -> None:
    path = tmp_path / "k.key"
    secret = (keydir / "example.com.rsa.key").read_bytes()
    if setup in ("world", "group"):
        path.write_bytes(secret)
        path.chmod(0o644 if setup == "world" else 0o620)
    elif setup == "garbage":
        path.write_bytes(b"not a key at all\n")
        path.chmod(0o600)
    elif setup == "badpem":
        path.write_bytes(secret[:200])
        path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        loads(f"[check.dkim_sign]\nkeys = example.com s1 {path}\n", "t.ini")
    message = str(err.value)
    assert message.startswith("t.ini: [check.dkim_sign] keys: expected a readable, private key")
    assert expected in message and str(path) in message
    assert secret[40:80].decode() not in message  # never key material


def test_keys_never_reach_logs_or_describe(keydir: Path, resolver: Resolver,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = sign_config(keydir)
    leave(cfg, MESSAGE, auth_user="alice")
    text = caplog.text + config.describe(cfg) + repr(cfg)
    for name in ("example.com.rsa.key", "example.com.ed.key"):
        material = (keydir / name).read_bytes().decode()
        for line in material.splitlines():
            if len(line) > 20:
                assert line not in text


def test_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--domain", "example.org", "--selector", "k1", "--type", "ed25519",
                 "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "example.org.k1.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert 'k1._domainkey.example.org. IN TXT ( "v=DKIM1; k=ed25519; p=' in out
    assert main(["keygen", "--domain", "example.org", "--selector", "k1", "--dir",
                 str(tmp_path)]) == 1  # never overwrites a key
    assert "exists; not overwriting" in capsys.readouterr().err


def test_start_up_warns_about_unpublished_or_different_keys(
        tmp_path: Path, keydir: Path, nameserver: Nameserver, resolver: Resolver) -> None:
    other = keys.generate(domain="example.com", selector="rsa", bits=1024,
                          directory=str(tmp_path))
    ini = tmp_path / "m.ini"
    ini.write_text(f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
                   f"[check.dkim_sign]\nkeys =\n    example.com rsa {other.path}\n"
                   f"    example.com ed {keydir}/example.com.ed.key\n"
                   f"    example.com nope {keydir}/example.com.ed.key\n")
    warnings = App(str(ini)).setup_warnings()
    assert len(warnings) == 2
    assert f"the key {other.path} does not match the record at rsa._domainkey.example.com " \
           "(different)" in warnings[0]
    assert "nope._domainkey.example.com (none)" in warnings[1]


def test_trusted_networks_with_signing_keys_are_warned_about(keydir: Path) -> None:
    """Every client in trusted_networks gets mail signed unauthenticated: say so."""

    def warnings(milter: str, checks: str = "bcc, trace, dkim_sign, authres",
                 keys: str = f"example.com ed {keydir}/example.com.ed.key") -> list[str]:
        cfg = loads(f"[milter]\nauthserv_id = mx.example.com\n{milter}"
                    f"[policy]\nchecks = {checks}\n[check.dkim_sign]\nkeys = {keys}\n")
        return [w for w in cfg.warnings if "trusted_networks" in w]

    assert warnings("trusted_networks = 127.0.0.0/8, ::1/128\n") == [
        "[milter] trusted_networks (127.0.0.0/8, ::1/128) with dkim_sign keys: every client in "
        "these networks (for loopback: every local user and application) counts as outbound "
        "and gets mail signed without authenticating; prefer SASL or an originating service "
        "(originating_daemons)"]
    assert warnings("") == []  # the default: no network is trusted
    assert warnings("trusted_networks = 10.0.0.0/8\n", checks="bcc, trace, authres") == []
    assert warnings("trusted_networks = 10.0.0.0/8\n", keys="") == []  # nothing is signed
