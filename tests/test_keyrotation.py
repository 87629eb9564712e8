"""DKIM key rotation (issue 13, item 6): make the next selector's key, check its record is
published, switch, and retire the old one, with `mailward keygen` and `mailward keycheck`
against the loopback DNS server; the switched configuration signs with the new selector and a
verifier finds both keys while the old one is still published."""

from __future__ import annotations

import json
from pathlib import Path

import dkim as dkimpy
import dns.resolver
import pytest

from mailward import cli
from mailward.lab.dns import Nameserver
from mailward.services import keys

MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: rotation\r\n"
           b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <rot@example.org>\r\n\r\n"
           b"Hello.\r\n")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def config(tmp_path: Path, nameserver: Nameserver, key: keys.SigningKey) -> str:
    path = tmp_path / f"{key.selector}.ini"
    path.write_text(f"[milter]\nauthserv_id = mx.example.org\n"
                    f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n"
                    f"[check.dkim_sign]\nkeys = {key.domain} {key.selector} {key.path}\n")
    return str(path)


def signed_by(capsys: pytest.CaptureFixture[str], ini: str, tmp_path: Path) -> bytes:
    """The message as it leaves, signed by the configuration `ini` (scan, as submitted mail)."""
    eml = tmp_path / "out.eml"
    eml.write_bytes(MESSAGE)
    code, out = run(capsys, "scan", "-c", ini, "--json", "--client-ip", "192.0.2.7",
                    "--auth-user", "alice@example.org", "--mail-from", "alice@example.org",
                    "--rcpt", "bob@example.net", str(eml))
    assert code == 0, out
    added = [e for e in json.loads(out)["final"]["header_edits"]
             if e["name"] == "DKIM-Signature"]
    assert len(added) == 1, out
    return f"DKIM-Signature:{added[0]['value']}\r\n".encode() + MESSAGE


def verifies(message: bytes, nameserver: Nameserver) -> bool:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port = ["127.0.0.1"], nameserver.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = r.resolve(name.decode(), "TXT")
        except dns.resolver.NXDOMAIN:
            return None
        return b"".join(answer[0].strings)

    return bool(dkimpy.verify(message, dnsfunc=lookup))


def test_a_selector_is_rotated_step_by_step(nameserver: Nameserver, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    old = keys.generate(domain="example.org", selector="2026a", directory=str(tmp_path))
    nameserver.load_zone(keys.zone_line(old))
    old_ini = config(tmp_path, nameserver, old)
    assert run(capsys, "keycheck", "-c", old_ini) == (
        0, f"published  2026a._domainkey.example.org {old.path}\n")
    assert b"s=2026a" in signed_by(capsys, old_ini, tmp_path)

    # 1. the next selector's key; not yet published
    code, out = run(capsys, "keygen", "--domain", "example.org", "--selector", "2027a",
                    "--dir", str(tmp_path))
    assert code == 0 and "2027a._domainkey.example.org. IN TXT" in out
    new_path = str(tmp_path / "example.org.2027a.key")
    check_new = ("keycheck", "-c", old_ini, "--key", new_path, "--domain", "example.org",
                 "--selector", "2027a")
    assert run(capsys, *check_new) == (1, f"missing    2027a._domainkey.example.org {new_path}\n")
    # 2. a wrong record (the old key copied under the new selector) is caught
    nameserver.load_zone(keys.zone_line(old).replace("2026a._domainkey", "2027a._domainkey"))
    assert run(capsys, *check_new) == (1, f"different  2027a._domainkey.example.org {new_path}\n")
    nameserver.clear()
    nameserver.load_zone(keys.zone_line(old))
    new = keys.load_key(new_path, domain="example.org", selector="2027a")
    nameserver.load_zone(keys.zone_line(new))
    assert run(capsys, *check_new) == (0, f"published  2027a._domainkey.example.org {new_path}\n")

    # 3. the switch: the new configuration checks out and signs with 2027a; mail signed
    # before it still verifies while 2026a stays published
    new_ini = config(tmp_path, nameserver, new)
    assert run(capsys, "check-config", "-c", new_ini)[0] == 0
    assert run(capsys, "keycheck", "-c", new_ini)[0] == 0
    before, after = signed_by(capsys, old_ini, tmp_path), signed_by(capsys, new_ini, tmp_path)
    assert b"s=2027a" in after and b"s=2026a" not in after
    assert verifies(before, nameserver) and verifies(after, nameserver)

    # 4. retirement: refused while the old key is still published, then revoked, then gone
    retired = ("keycheck", "-c", new_ini, "--retired", "--domain", "example.org",
               "--selector", "2026a")
    assert run(capsys, *retired) == (1, "published  2026a._domainkey.example.org\n")
    nameserver.clear()
    nameserver.load_zone(keys.zone_line(new))
    nameserver.add("2026a._domainkey.example.org", "TXT", '"v=DKIM1; k=rsa; p="')
    assert run(capsys, *retired) == (0, "revoked    2026a._domainkey.example.org\n")
    assert not verifies(before, nameserver) and verifies(after, nameserver)
    nameserver.clear()
    nameserver.load_zone(keys.zone_line(new))
    assert run(capsys, *retired) == (0, "gone       2026a._domainkey.example.org\n")


def test_keycheck_fails_when_dns_does(nameserver: Nameserver, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    key = keys.generate(domain="example.org", selector="s1", directory=str(tmp_path))
    ini = config(tmp_path, nameserver, key)
    nameserver.servfail.add("s1._domainkey.example.org")
    code, out = run(capsys, "keycheck", "-c", ini)
    assert code == 1 and out.startswith("error      cannot look up the record")


def test_keycheck_needs_a_domain_and_selector_for_one_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ini = tmp_path / "empty.ini"
    ini.write_text("")
    assert cli.main(["keycheck", "-c", str(ini), "--retired"]) == 1
    assert "need --domain and --selector" in capsys.readouterr().err
    assert cli.main(["keycheck", "-c", str(ini), "--retired", "--domain", "../x",
                     "--selector", "s"]) == 1
    assert "not a DNS name" in capsys.readouterr().err
