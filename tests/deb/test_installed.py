"""The Debian package, installed (make test-deb builds it, installs it with apt-get and runs
the whole suite once more on Debian's own python3 against what it installed; these tests check
the installation itself)."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import dkim
import dns
import milter
import prometheus_client
import pytest
import spf

import mailward
from mailward.lab.postfix import MailwardProcess, merge_ini, running_lab
from tests.conftest import need
from tests.integration.conftest import BASE_CONFIG, ZONE

INSTALLED = mailward.__file__.startswith("/usr/lib/python3/dist-packages/")
PRIVATE = Path("/usr/lib/mailward/python")


def installed() -> None:
    need(INSTALLED, "the Debian package is not what runs these tests: make test-deb")


def test_the_package_is_what_runs() -> None:
    installed()
    status = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "mailward"],
                            capture_output=True, text=True, check=True).stdout
    assert status == f"install ok installed {mailward.__version__}"
    # bundled where Debian 12's copy is too old, Debian's own elsewhere
    for module in (dns, dkim, prometheus_client):
        assert Path(str(module.__file__)).is_relative_to(PRIVATE), module.__file__
    for module in (milter, spf):
        assert str(module.__file__).startswith("/usr/lib/python3/dist-packages/"), module.__file__


def test_files_in_place() -> None:
    installed()
    files = subprocess.run(["dpkg-query", "-L", "mailward"], capture_output=True, text=True,
                           check=True).stdout.split()
    for path in ("/usr/bin/mailward", "/lib/systemd/system/mailward.service",
                 "/lib/systemd/system/mailward-sts.service",
                 "/lib/systemd/system/mailward-reports.service",
                 "/lib/systemd/system/mailward-reports.timer",
                 "/usr/lib/tmpfiles.d/mailward.conf", "/usr/lib/sysusers.d/mailward.conf",
                 "/etc/mailward/mailward.ini", "/usr/share/doc/mailward/README.Debian",
                 "/usr/share/mailward/grafana/mailward.json",
                 "/usr/share/mailward/prometheus/mailward-rules.yml",
                 "/usr/share/man/man8/mailward.8.gz"):
        assert path in files, path
    conffiles = subprocess.run(["dpkg-query", "-W", "-f", "${Conffiles}", "mailward"],
                               capture_output=True, text=True, check=True).stdout
    assert "/etc/mailward/mailward.ini" in conffiles
    unit = Path("/lib/systemd/system/mailward.service").read_text()
    assert "ExecStart=/usr/bin/mailward run -c /etc/mailward/mailward.ini" in unit
    assert not re.search(r"^Exec.*/opt/", unit, re.M)
    sts = Path("/lib/systemd/system/mailward-sts.service").read_text()
    assert "ExecStart=/usr/bin/mailward sts run -c /etc/mailward/mailward.ini" in sts
    assert not re.search(r"^Exec.*/opt/", sts, re.M)
    assert subprocess.run(["id", "mailward"], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("name", ["mailward.service", "mailward-sts.service",
                                  "mailward-reports.service"])
def test_installed_unit_verifies_and_is_hardened(name: str) -> None:
    installed()
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is missing")
    unit = f"/lib/systemd/system/{name}"
    done = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                              capture_output=True, text=True, check=False).stdout
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", security)
    assert found and float(found.group(1)) <= 1.4, security


def test_installed_check_config() -> None:
    installed()
    done = subprocess.run(["/usr/bin/mailward", "check-config", "-c",
                           "/etc/mailward/mailward.ini"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "[milter]" in done.stdout


@pytest.mark.parametrize("engine", ["asyncio", "libmilter"])
def test_mail_through_postfix_to_the_installed_mailward(engine: str) -> None:
    """The lab Postfix hands a message to /usr/bin/mailward, on either engine; it arrives
    judged."""
    installed()
    root = Path(tempfile.mkdtemp(prefix="mailward-deb-"))
    try:
        with running_lab(merge_ini(BASE_CONFIG, f"[milter]\nengine = {engine}\n"), root=root,
                         zone=ZONE, command=["/usr/bin/mailward"]) as lab:
            mid = "<deb-1@example.org>"
            with smtplib.SMTP("127.0.0.1", lab.postfix.smtp_port, timeout=60) as s:
                s.sendmail("alice@example.org", ["bob@example.net"],
                           f"From: alice@example.org\r\nTo: bob@example.net\r\n"
                           f"Message-ID: {mid}\r\nSubject: deb\r\n\r\nHello.\r\n".encode())
            mail = lab.sink.wait_for(lambda m: mid.encode() in m.data, 30)
            ar = dict(mail.headers())["Authentication-Results"]
            assert "spf=pass smtp.mailfrom=alice@example.org" in ar
            assert "dmarc=pass header.from=example.org" in ar
            assert lab.mailward.command == ["/usr/bin/mailward"]
            assert isinstance(lab.mailward, MailwardProcess)
            assert f"(engine {engine})" in lab.mailward.log()
    finally:
        shutil.rmtree(root, ignore_errors=True)
