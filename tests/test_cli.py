"""The command line: scan (human and JSON), check-config, keygen, run's socket, --version."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim as dkimpy
import pytest

from mailward import __version__
from mailward.cli import main
from mailward.lab.dns import Nameserver
from mailward.scan import parse_message
from mailward.services import keys
from tests.checks.test_dkim import publish, rsa_key

MESSAGE = (b"From: a@example.org\r\nTo: b@example.net\r\nBcc: hidden@example.org\r\n"
           b"Authentication-Results: mx.example.com; spf=pass\r\n"
           b"Subject:  two spaces\r\nX-Fold: one\r\n\ttwo\r\n\r\nbody\r\n")
CONFIG = ("[milter]\nauthserv_id = mx.example.com\n"
          "[dns]\nnameservers = 127.0.0.1:{port}\ntimeout = 0.5\nlifetime = 1\n"
          "[check.tls]\nrequire_domains = secure.example\n")


@pytest.fixture
def files(tmp_path: Path, nameserver: Nameserver) -> tuple[Path, Path]:
    nameserver.add("example.org", "TXT", '"v=spf1 ip4:203.0.113.0/24 -all"')
    (tmp_path / "m.eml").write_bytes(MESSAGE)
    (tmp_path / "c.ini").write_text(CONFIG.format(port=nameserver.port))
    return tmp_path / "m.eml", tmp_path / "c.ini"


def test_scan_json(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    rc = main(["scan", str(eml), "-c", str(ini), "--client-ip", "203.0.113.5",
               "--mail-from", "a@example.org", "--rcpt", "b@example.net",
               "--tls-version", "TLSv1.3", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["direction"] == "inbound"
    final = data["final"]
    assert final["action"] == "accept"
    assert {r["check"]: r["result"] for r in final["results"]} == {
        "tls": "pass", "sender": "none", "spf": "pass", "dkim": "none", "arc": "none",
        "dmarc": "none", "bcc": "pass", "trace": "none", "dkim_sign": "none", "authres": "pass",
        "arc_seal": "none"}
    assert final["header_edits"] == [
        {"op": "delete", "name": "Authentication-Results", "index": 1},
        {"op": "delete", "name": "Bcc", "index": 1},
        {"op": "insert", "name": "Authentication-Results",
         "value": "mx.example.com;\n\tx-tls=pass smtp.version=TLSv1.3;\n"
                  "\tspf=pass smtp.mailfrom=a@example.org;\n\tdkim=none;\n\tarc=none;\n"
                  "\tdmarc=none header.from=example.org"},
    ]


def test_scan_spf_fail_refused_at_mail_from(files: tuple[Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    ini.write_text(ini.read_text() + "[check.spf]\non_fail = reject\n")
    rc = main(["scan", str(eml), "-c", str(ini), "--client-ip", "198.51.100.9",
               "--helo", "client.example.net", "--mail-from", "a@example.org"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "MAIL FROM: reject  550 5.7.23 SPF validation failed  (by spf)" in out


def test_scan_human_refused_before_data(files: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    rc = main(["scan", str(eml), "-c", str(ini), "--client-ip", "203.0.113.5",
               "--rcpt", "x@secure.example"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "RCPT TO <x@secure.example>: reject  530 5.7.0 Must issue a STARTTLS command " \
           "first  (by tls)" in out
    assert "end of message: not reached (refused before DATA)" in out


def test_check_config(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                      tmp_path: Path) -> None:
    _, ini = files
    assert main(["check-config", "-c", str(ini)]) == 0
    assert "require_domains = secure.example" in capsys.readouterr().out
    bad = tmp_path / "bad.ini"
    bad.write_text("[check.tls]\nmin_version = TLS1.2\n")
    assert main(["check-config", "-c", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"mailward: {bad}: [check.tls] min_version: expected one of SSLv3, TLSv1, TLSv1.1, "
        "TLSv1.2, TLSv1.3, got 'TLS1.2'\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"mailward {__version__}\n"


def test_parse_message_keeps_values_as_a_milter_sees_them() -> None:
    headers, body = parse_message(MESSAGE)
    assert headers[4] == ("Subject", "  two spaces")
    assert headers[5] == ("X-Fold", " one\n\ttwo")
    assert body == b"body\n"
    # a line that is no header ends the header, as in Postfix
    headers, body = parse_message(b"A: 1\nnot a header\nB: 2\n\nx")
    assert headers == [("A", " 1")] and body == b"not a header\nB: 2\n\nx"


def test_scan_refuses_a_tls_version_the_mta_never_reports(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["scan", "--tls-version", "bogus", "-"])
    assert done.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_parse_message_is_linear_in_folds() -> None:
    """A field of many folds (scan reads files anyone may send) costs linear time: the value's
    lines are joined once (this was quadratic: 80,000 folds 0.25 s, now 0.04 s)."""
    def cost(folds: int) -> float:
        raw = b"Subject: x" + b"\r\n y" * folds + b"\r\n\r\nbody"
        start = time.thread_time()  # CPU time: other processes do not count
        headers, _ = parse_message(raw)
        assert len(headers[0][1]) == 2 + 3 * folds
        return time.thread_time() - start
    small = min(cost(10_000) for _ in range(3))
    large = min(cost(200_000) for _ in range(2))
    assert large < 40 * max(small, 0.001), (small, large)


def test_scan_verifies_dkim_like_the_milter(files: tuple[Path, Path], nameserver: Nameserver,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    pem, public = rsa_key(1024)
    publish(nameserver, "s1._domainkey.example.org", f"v=DKIM1; p={public}")
    nameserver.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject"')
    message = MESSAGE.replace(b"Bcc: hidden@example.org\r\n", b"")
    for canon in ((b"simple", b"simple"), (b"relaxed", b"relaxed")):
        eml.write_bytes(dkimpy.sign(message, b"s1", b"example.org", pem, canonicalize=canon)
                        + message)
        rc = main(["scan", str(eml), "-c", str(ini), "--client-ip", "198.51.100.9",
                   "--mail-from", "bounce@example.net", "--json"])
        results = {r["check"]: r["result"] for r in
                   json.loads(capsys.readouterr().out)["final"]["results"]}
        assert rc == 0 and results["dkim"] == "pass" and results["dmarc"] == "pass", results


def test_scan_shows_the_arc_chain_and_the_override(files: tuple[Path, Path],
                                                   nameserver: Nameserver,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    pem, public = rsa_key(2048)
    publish(nameserver, "s1._domainkey.lists.example", f"v=DKIM1; p={public}")
    nameserver.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject"')
    message = MESSAGE.replace(b"Bcc: hidden@example.org\r\n", b"").replace(
        b"Authentication-Results: mx.example.com; spf=pass\r\n", b"")
    ar = b"Authentication-Results: lists.example; arc=none; dmarc=pass header.from=example.org\r\n"
    sealed = b"".join(dkimpy.arc_sign(ar + message, b"s1", b"lists.example", pem,
                                      b"lists.example")) + message
    eml.write_bytes(sealed)
    args = ["scan", str(eml), "-c", str(ini), "--client-ip", "198.51.100.9", "--mail-from",
            "bounces@lists.example"]
    assert main(args) == 2  # lists.example is not trusted: p=reject applies
    assert "arc: pass, 1 set(s) sealed by lists.example, oldest-pass 0\n" in \
        capsys.readouterr().out
    ini.write_text(ini.read_text() + "[check.arc]\ntrusted_sealers = lists.example\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("arc: pass, 1 set(s) sealed by lists.example, oldest-pass 0; DMARC failure "
            "accepted by ARC from lists.example\n") in out
    assert "example.org: p=reject at example.org, accepted by ARC from lists.example (i=1)" in out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["final"]["arc"] == {
        "result": "pass", "reason": "", "instances": 1, "oldest_pass": 0,
        "sealers": ["lists.example"], "trusted": ["lists.example (i=1)"],
        "dmarc_override": "lists.example"}


def test_scan_refuses_a_client_ip_that_is_no_address(files: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    eml, ini = files
    assert main(["scan", str(eml), "-c", str(ini), "--client-ip", "nonsense"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "", "mailward: --client-ip: 'nonsense' is not an IP address\n")


@pytest.mark.parametrize(("args", "expected"), [
    (["--domain", "../x", "--selector", "s1"],
     "--domain: '../x' is not a DNS name: it has an empty label (a leading, trailing or "
     "doubled dot)"),
    (["--domain", "example.org", "--selector", "../../x"],
     "--selector: '../../x' is not a DNS name: it has an empty label"),
    (["--domain", "/tmp/x", "--selector", "s1"],
     "--domain: '/tmp/x' is not a DNS name: label '/tmp/x' is not 1 to 63 letters, digits "
     "and hyphens (no hyphen first or last)"),
    (["--domain", "example.org", "--selector", "a/b"],
     "--selector: 'a/b' is not a DNS name: label 'a/b' is not 1 to 63"),
])
def test_keygen_refuses_names_that_are_not_dns_names(tmp_path: Path, args: list[str],
                                                     expected: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    assert main(["keygen", *args, "--type", "ed25519", "--dir", str(keydir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"mailward: {expected}") and captured.err.endswith("\n")
    assert list(tmp_path.rglob("*")) == [keydir]  # nothing written, inside or outside --dir


def test_check_config_warns_about_a_tcp_socket_and_trusted_signing(
        files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ini = files
    key = keys.generate(domain="example.org", selector="s1", kind="ed25519",
                        directory=str(tmp_path))
    signing = f"[check.dkim_sign]\nkeys = example.org s1 {key.path}\n"
    ini.write_text(ini.read_text() + signing)
    assert main(["check-config", "-c", str(ini)]) == 0
    out = capsys.readouterr().out
    assert "socket = unix:/var/spool/postfix/mailward/milter.sock\nengine = asyncio\n" in out
    assert "trusted_networks = \n" in out
    assert "is TCP" not in out and "with dkim_sign keys" not in out  # the defaults are quiet
    ini.write_text(ini.read_text().replace(
        "[milter]\n", "[milter]\nsocket = inet:8895@127.0.0.1\n"
                      "trusted_networks = 127.0.0.0/8, ::1/128\n"))
    assert main(["check-config", "-c", str(ini)]) == 0
    out = capsys.readouterr().out
    assert ("# warning: [milter] socket inet:8895@127.0.0.1 is TCP on loopback, so every "
            "local user can connect") in out
    assert ("# warning: [milter] trusted_networks (127.0.0.0/8, ::1/128) with dkim_sign keys: "
            "every client in these networks (for loopback: every local user and application) "
            "counts as outbound and gets mail signed without authenticating") in out


def test_run_gives_its_unix_socket_to_the_mta_only() -> None:
    """`mailward run` makes its unix socket mode 0660, group postfix when there is one."""
    workdir = Path(tempfile.mkdtemp(prefix="mw-"))  # short: a socket path has 107 bytes
    sock = workdir / "milter.sock"
    ini = workdir / "m.ini"
    ini.write_text(f"[milter]\nsocket = unix:{sock}\nauthserv_id = mx.example.com\n"
                   "local_domains = example.com\n[metrics]\nlisten =\n"
                   f"[reports]\nsqlite_path = {workdir / 'reports.sqlite'}\n")
    try:
        group = grp.getgrnam("postfix").gr_gid
    except KeyError:
        group = os.getegid()  # no Postfix here: the socket keeps our group
    if os.geteuid() != 0 and group not in os.getgroups():
        group = os.getegid()  # chgrp is refused (and logged); the mode still applies
    log = workdir / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mailward", "run", "-c", str(ini)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.exists():
                info = sock.stat()
                if (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, group):
                    break
            time.sleep(0.05)
        assert info is not None, log.read_text()
        assert stat.S_ISSOCK(info.st_mode)
        assert (oct(stat.S_IMODE(info.st_mode)), info.st_gid) == (oct(0o660), group)
    finally:
        proc.terminate()
        proc.wait(15)
        text = log.read_text()
        shutil.rmtree(workdir, ignore_errors=True)
    assert "Traceback" not in text and " ERROR " not in text, text
