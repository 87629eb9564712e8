"""mailward audit: a hardened and a careless Postfix configuration (read by the real
`postconf -c DIR`), and lab DNS zones for a well-kept and a neglected domain; each finding."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from mailward import audit, cli
from mailward.lab.dns import Nameserver
from mailward.lab.tlslab import PolicyServer, TestCA
from mailward.services import keys
from mailward.services.dns import Resolver
from tests.conftest import need

HARDENED_MAIN = """\
compatibility_level = 3.6
mynetworks = 127.0.0.0/8 [::1]/128
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination
smtpd_tls_security_level = may
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtp_tls_protocols = !SSLv2, !SSLv3, !TLSv1, !TLSv1.1
smtp_tls_mandatory_protocols = >=TLSv1.2
smtpd_sasl_auth_enable = yes
smtpd_tls_auth_only = yes
disable_vrfy_command = yes
smtpd_banner = $myhostname ESMTP
smtpd_helo_required = yes
smtpd_client_connection_rate_limit = 30
milter_default_action = tempfail
smtpd_milters = unix:/mailward/milter.sock
non_smtpd_milters = $smtpd_milters
smtp_tls_policy_maps = socketmap:unix:/run/sts/sts.sock:postfix
"""
HARDENED_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o milter_macro_daemon_name=ORIGINATING
"""
CARELESS_MAIN = """\
compatibility_level = 3.6
mynetworks = 0.0.0.0/0
smtpd_relay_restrictions = permit_mynetworks, permit
smtpd_tls_protocols = !SSLv2, !SSLv3
smtpd_sasl_auth_enable = yes
smtpd_banner = $myhostname ESMTP $mail_name ($mail_version)
milter_default_action = accept
smtpd_milters = inet:127.0.0.1:8891
"""
CARELESS_MASTER = "smtp inet n - y - - smtpd\n"

MTA_EXPECTED_CARELESS = {
    "open-relay": "fail", "mynetworks": "fail", "starttls-inbound": "fail",
    "smtpd_tls_protocols": "warn", "smtpd_tls_mandatory_protocols": "warn",
    "smtp_tls_protocols": "warn", "smtp_tls_mandatory_protocols": "warn",
    "auth-over-tls": "fail", "vrfy": "warn", "banner": "warn", "helo-required": "warn",
    "rate-limits": "warn", "milter-default-action": "fail", "smtpd_milters": "fail",
    "non_smtpd_milters": "warn", "submission-originating": "warn", "sts-policy-map": "warn",
}

SOCKET = "unix:/var/spool/postfix/mailward/milter.sock"


def postfix_dir(tmp_path: Path, name: str, main: str, master: str) -> str:
    need(shutil.which("postconf") is not None, "postconf is missing: apt-get install postfix")
    d = tmp_path / name
    d.mkdir()
    (d / "main.cf").write_text(main)
    (d / "master.cf").write_text(master)
    return str(d)


def by_check(findings: list[audit.Finding]) -> dict[str, str]:
    return {f.check: f.status for f in findings}


def test_hardened_mta_passes_everything(tmp_path: Path) -> None:
    conf, services = audit.postconf(postfix_dir(tmp_path, "good", HARDENED_MAIN,
                                                HARDENED_MASTER))
    findings = audit.mta_findings(conf, services, SOCKET)
    assert by_check(findings) == dict.fromkeys(MTA_EXPECTED_CARELESS, "pass")
    assert all(not f.fix for f in findings)


def test_careless_mta_gets_each_finding_with_its_fix(tmp_path: Path) -> None:
    conf, services = audit.postconf(postfix_dir(tmp_path, "bad", CARELESS_MAIN,
                                                CARELESS_MASTER))
    findings = audit.mta_findings(conf, services, SOCKET)
    assert by_check(findings) == MTA_EXPECTED_CARELESS
    fixes = {f.check: f.fix for f in findings}
    assert "defer_unauth_destination" in fixes["open-relay"]
    assert fixes["smtpd_milters"] == "smtpd_milters = unix:/mailward/milter.sock"
    assert fixes["milter-default-action"].startswith("milter_default_action = tempfail")
    assert all(f.fix for f in findings if f.status != "pass")


@pytest.mark.parametrize(("value", "old"), [
    (">=TLSv1.2", []), (">=TLSv1", ["TLSv1", "TLSv1.1"]),
    ("!SSLv2, !SSLv3", ["TLSv1", "TLSv1.1"]), ("!SSLv2 !SSLv3 !TLSv1 !TLSv1.1", []),
    ("", ["SSLv2", "SSLv3", "TLSv1", "TLSv1.1"]), (">=TLSv1.3", []),
])
def test_old_tls_protocols(value: str, old: list[str]) -> None:
    assert audit._tls_allows_old(value) == old


GOOD_ZONE = """
good.example.             TXT "v=spf1 ip4:192.0.2.0/24 include:_spf.good.example -all"
_spf.good.example.        TXT "v=spf1 a mx -all"
_dmarc.good.example.      TXT "v=DMARC1; p=reject; rua=mailto:dmarc@good.example"
_mta-sts.good.example.    TXT "v=STSv1; id=20261203"
good.example.             MX 10 mx1.good.example.
good.example.             MX 20 mx2.good.example.
mta-sts.good.example.     A 127.0.0.1
_smtp._tls.good.example.  TXT "v=TLSRPTv1; rua=mailto:tlsrpt@good.example"
"""
# bad.example: SPF that passes everyone, DMARC only monitoring without rua, nothing else;
# deep.example: eleven lookups through includes; none.example: no record at all.
BAD_ZONE = """
bad.example.              TXT "v=spf1 +all"
_dmarc.bad.example.       TXT "v=DMARC1; p=none"
deep.example.             TXT "v=spf1 include:d1.deep.example include:d2.deep.example -all"
d1.deep.example.          TXT "v=spf1 a mx ptr exists:%{i}.x.deep.example -all"
d2.deep.example.          TXT "v=spf1 a mx a:x.deep.example mx:x.deep.example a/24 -all"
_dmarc.deep.example.      TXT "v=DMARC1; p=quarantine; t=y; rua=mailto:d@deep.example"
"""


GOOD_POLICY = "version: STSv1\nmode: enforce\nmx: *.good.example\nmax_age: 1209600\n"


class Policies(NamedTuple):
    server: PolicyServer
    ca_file: Path

    def policy(self, domain: str, text: str) -> None:
        self.server.policy(domain, text)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Policies]:
    """An HTTPS policy host for every mta-sts.*.example below, with a test CA."""
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    cert, key = ca.issue("mta-sts", [f"mta-sts.{d}.example" for d in (
        "good", "testing", "stray", "gone", "short")])
    server = PolicyServer(cert, key)
    yield Policies(server, ca.ca_file)
    server.close()


def ini(tmp_path: Path, nameserver: Nameserver, domains: str, extra: str = "",
        policies: Policies | None = None) -> str:
    path = tmp_path / "mailward.ini"
    sts = (f"[sts]\nca_file = {policies.ca_file}\nhttps_port = {policies.server.port}\n"
           "allow_private_addresses = yes\n"
           f"fetch_timeout = 3\n" if policies else "")
    path.write_text(f"[milter]\nauthserv_id = mx.good.example\nlocal_domains = {domains}\n"
                    f"[dns]\nnameservers = 127.0.0.1:{nameserver.port}\n{sts}{extra}")
    return str(path)


def test_well_kept_domain_passes(nameserver: Nameserver, tmp_path: Path,
                                 policies: Policies,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    key = keys.generate(domain="good.example", selector="s1", directory=str(tmp_path))
    nameserver.load_zone(GOOD_ZONE + keys.zone_line(key))
    policies.policy("good.example", GOOD_POLICY)
    config = ini(tmp_path, nameserver, "good.example",
                 f"[check.dkim_sign]\nkeys = good.example s1 {key.path}\n", policies)
    assert cli.main(["audit", "-c", config, "--no-mta", "--json"]) == 0
    found = {(f["area"], f["check"]): f for f in json.loads(capsys.readouterr().out)}
    assert {k: f["status"] for k, f in found.items()} == {
        ("good.example", c): "pass" for c in ("spf", "dkim", "dmarc", "mta-sts",
                                              "mta-sts-policy", "tls-rpt")}
    assert "(3 lookups)" in found["good.example", "spf"]["detail"]
    assert found["good.example", "mta-sts-policy"]["detail"] == \
        "mode=enforce max_age=1209600 mx=*.good.example"


STS_ZONE = "".join(f"""
_mta-sts.{d}.example. TXT "v=STSv1; id=1"
mta-sts.{d}.example.  A 127.0.0.1
{d}.example.          MX 10 mx.{d}.example.
""" for d in ("testing", "stray", "gone", "short")) + """
stray.example.        MX 20 backup.elsewhere.example.
_mta-sts.broken.example. TXT "v=STSv1; id=not-valid!"
"""


def test_each_mta_sts_mistake_is_found(nameserver: Nameserver, tmp_path: Path,
                                       policies: Policies,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    nameserver.load_zone(STS_ZONE)
    policies.policy("testing.example", GOOD_POLICY.replace("enforce", "testing")
                    .replace("good", "testing"))
    policies.policy("stray.example", GOOD_POLICY.replace("*.good", "mx.stray"))
    policies.policy("short.example", GOOD_POLICY.replace("*.good", "*.short")
                    .replace("1209600", "3600"))
    # gone.example publishes the TXT record, but its policy host answers 404
    domains = "testing.example stray.example gone.example short.example broken.example"
    config = ini(tmp_path, nameserver, domains, "", policies)
    assert cli.main(["audit", "-c", config, "--no-mta", "--json"]) == 1
    found = {(f["area"], f["check"]): f for f in json.loads(capsys.readouterr().out)
             if f["check"].startswith("mta-sts")}
    status = {k: f["status"] for k, f in found.items()}
    assert status == {
        ("testing.example", "mta-sts"): "pass", ("testing.example", "mta-sts-policy"): "warn",
        ("stray.example", "mta-sts"): "pass", ("stray.example", "mta-sts-policy"): "fail",
        ("gone.example", "mta-sts"): "pass", ("gone.example", "mta-sts-policy"): "fail",
        ("short.example", "mta-sts"): "pass", ("short.example", "mta-sts-policy"): "warn",
        ("broken.example", "mta-sts"): "fail",
    }
    assert "MX backup.elsewhere.example not named" in \
        found["stray.example", "mta-sts-policy"]["detail"]
    assert "HTTP status 404" in found["gone.example", "mta-sts-policy"]["detail"]


def test_neglected_domains_get_each_finding(nameserver: Nameserver, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    nameserver.load_zone(BAD_ZONE)
    key = keys.generate(domain="bad.example", selector="s1", directory=str(tmp_path))
    config = ini(tmp_path, nameserver, "bad.example deep.example none.example",
                 f"[check.dkim_sign]\nkeys = bad.example s1 {key.path}\n")
    assert cli.main(["audit", "-c", config, "--no-mta", "--json"]) == 1
    found = {(f["area"], f["check"]): f["status"] for f in json.loads(capsys.readouterr().out)}
    assert found == {
        ("bad.example", "spf"): "fail", ("bad.example", "dkim"): "fail",
        ("bad.example", "dmarc"): "warn", ("bad.example", "dmarc-rua"): "warn",
        ("bad.example", "mta-sts"): "warn", ("bad.example", "tls-rpt"): "warn",
        ("deep.example", "spf"): "fail", ("deep.example", "dkim"): "warn",
        ("deep.example", "dmarc"): "warn", ("deep.example", "mta-sts"): "warn",
        ("deep.example", "tls-rpt"): "warn",
        ("none.example", "spf"): "fail", ("none.example", "dkim"): "warn",
        ("none.example", "dmarc"): "fail", ("none.example", "mta-sts"): "warn",
        ("none.example", "tls-rpt"): "warn",
    }
    resolver = Resolver(cli._config_or_defaults(config).dns)
    record, lookups = audit.spf_lookups("deep.example", resolver)
    assert record is not None and lookups == 11  # 2 includes + 4 + 5


def test_dns_failure_is_a_failure_not_a_pass(nameserver: Nameserver, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    nameserver.load_zone(GOOD_ZONE)
    nameserver.servfail.add("_dmarc.good.example")
    config = ini(tmp_path, nameserver, "good.example")
    assert cli.main(["audit", "-c", config, "--no-mta"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  good.example" in out and "dmarc" in out and "lookup failed" in out


def test_whole_audit_through_the_cli(nameserver: Nameserver, tmp_path: Path,
                                     policies: Policies,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    nameserver.load_zone(GOOD_ZONE)
    policies.policy("good.example", GOOD_POLICY)
    good = postfix_dir(tmp_path, "pf", HARDENED_MAIN, HARDENED_MASTER)
    config = ini(tmp_path, nameserver, "good.example", "", policies)
    code = cli.main(["audit", "-c", config, "--postfix-dir", good])
    out = capsys.readouterr().out
    assert code == 0, out  # only warnings: no DKIM key configured
    assert "WARN  good.example" in out and "PASS  mta" in out and "FAIL" not in out
