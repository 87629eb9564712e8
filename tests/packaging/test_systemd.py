"""The systemd unit is valid and keeps its hardening (checked by systemd-analyze, offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "mailward.service"
TMPFILES = UNIT.with_suffix(".tmpfiles")


@pytest.mark.parametrize("name", ["mailward.service", "mailward-sts.service",
                                  "mailward-reports.service"])
def test_unit_verifies_and_is_hardened(tmp_path: Path, name: str) -> None:
    need(shutil.which("systemd-analyze") is not None,
         "systemd-analyze is missing: apt-get install systemd")
    source = UNIT.with_name(name)
    unit = tmp_path / name
    # point ExecStart at a binary that exists here, as verify checks it
    unit.write_text(source.read_text().replace("/opt/mailward/bin/mailward",
                                               str(Path(sys.executable).parent / "mailward")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, check=False).stdout
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)",
                               security).group(1))  # type: ignore[union-attr]
    assert exposure <= 1.4, security
    text = source.read_text()
    if name == "mailward-reports.service":
        for line in ("Type=oneshot\n", "User=mailward", "reports build --period yesterday "
                     "--send", "StateDirectory=mailward"):
            assert line in text
        timer = source.with_suffix(".timer").read_text()
        assert "OnCalendar=*-*-* 00:15:00 UTC" in timer and "Persistent=true" in timer
        return
    if name == "mailward-sts.service":
        for line in ("Type=notify\n", "User=mailward", "sts run", "StateDirectory=mailward",
                     "smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix"):
            assert line in text
        return
    for line in ("Type=notify\n", "NotifyAccess=main", "WatchdogSec=", "User=mailward",
                 "Restart=on-failure", "NoNewPrivileges=yes",
                 "ExecReload=/bin/kill -USR1 $MAINPID", "milter_default_action = tempfail",
                 "milter_protocol = 6", "non_smtpd_milters"):
        assert line in text


def test_tmpfiles_makes_the_socket_directory_for_postfix() -> None:
    lines = [ln.split() for ln in TMPFILES.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines == [["d", "/var/spool/postfix/mailward", "2750", "mailward", "postfix", "-"]]
    assert "ReadWritePaths=-/var/spool/postfix/mailward" in UNIT.read_text()
    assert "Sendmail-only" in TMPFILES.read_text()
