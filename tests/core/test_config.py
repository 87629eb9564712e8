"""Config: every error path names file, section, key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailward.checks import REGISTRY
from mailward.core import config
from mailward.core.settings import Mode
from mailward.core.verdict import Action, Quarantine, Reply
from mailward.errors import ConfigError
from tests.conftest import loads

REPO = Path(__file__).resolve().parents[2]


def test_reference_config_loads_and_lists_every_key() -> None:
    cfg = config.load(REPO / "conf" / "mailward.ini", REGISTRY)
    # every check, in the default order
    assert [link.name for link in cfg.chain] == [li.name for li in loads("").chain]
    assert {link.name for link in cfg.chain} == set(REGISTRY.default_order)
    assert cfg.milter.socket == "unix:/var/spool/postfix/mailward/milter.sock"
    assert cfg.milter.trusted_networks == ()
    assert cfg.metrics.listen == ("127.0.0.1", 9895)
    assert [w for w in cfg.warnings if "socket" in w or "trusted" in w or "metrics" in w] == []
    text = (REPO / "conf" / "mailward.ini").read_text()
    # every effective key is documented in the reference file
    for line in config.describe(cfg).splitlines():
        if " = " in line:
            key = line.split(" = ")[0]
            assert f"{key} =" in text or f"#{key} =" in text or f"  {key} =" in text, key


def test_describe_round_trips() -> None:
    cfg = loads("[milter]\nauthserv_id = mx.example.com\nlocal_domains = a.example\n"
                       "[check.tls]\nrequire_domains = b.example\nmode = monitor\n")
    again = loads(config.describe(cfg))
    assert again.milter == cfg.milter
    assert again.policy == cfg.policy
    assert [(li.name, li.settings, li.mode) for li in again.chain] == \
        [(li.name, li.settings, li.mode) for li in cfg.chain]


@pytest.mark.parametrize(("text", "expected"), [
    ("[milter]\nsocket = inet:99999@127.0.0.1\n",
     "[milter] socket: expected inet:PORT@HOST, inet6:PORT@ADDRESS or unix:/absolute/path, "
     "got 'inet:99999@127.0.0.1'"),
    ("[milter]\nsocket = unix:relative.sock\n", "[milter] socket: expected"),
    ("[milter]\nsocket = tcp:25@localhost\n", "[milter] socket: expected"),
    ("[milter]\nsocket = inet6:8895@127.0.0.1\n", "[milter] socket: expected"),
    ("[milter]\nsockte = inet:8895@127.0.0.1\n",
     "[milter] sockte: expected a known key of this section"),
    ("[milter]\ntimeout = abc\n", "[milter] timeout: expected seconds"),
    ("[milter]\nmode = enforcing\n", "[milter] mode: expected one of enforce, monitor, got "
                                     "'enforcing'"),
    ("[milter]\ntrusted_networks = 10.0.0.0/8, 300.1.1.0/24\n",
     "[milter] trusted_networks: expected a list of IP networks"),
    ("[milter]\nauthserv_id = bad id;\n", "[milter] authserv_id: expected a host name"),
    ("[milter]\nspool_threshold = lots\n", "[milter] spool_threshold: expected a size"),
    ("[milter]\nspool_threshold = 0\n", "[milter] spool_threshold: expected a size of at "
                                        "least 1K: bodies larger than it are spooled to disk, "
                                        "and 0 would keep every body in memory, got '0 bytes'"),
    ("[milter]\nspool_threshold = 1023\n", "[milter] spool_threshold: expected a size of at "
                                           "least 1K"),
    ("[milter]\nlocal_domains = ok.example, not a domain!\n",
     "[milter] local_domains: expected a list of domain names, got 'domain!'"),
    ("[milter]\nlog_level = loud\n", "[milter] log_level: expected one of debug"),
    ("[metrics]\nlisten = 0.0.0.0\n", "[metrics] listen: expected HOST:PORT"),
    ("[metrics]\nlisten = localhost:9000\n", "[metrics] listen: expected HOST:PORT"),
    ("[policy]\nchecks = tls, spam\n", "[policy] checks: expected check names"),
    ("[policy]\nchecks =\n", "[policy] checks: expected at least one check name (an empty "
                             "chain checks nothing; to turn a check off, set enabled = no in "
                             "its [check.NAME] section), got ''"),
    ("[policy]\nchecks = ,\n", "[policy] checks: expected at least one check name"),
    ("[policy]\nchecks = tls, tls\n", "[policy] checks: expected each check named once"),
    ("[policy]\nchecks = authres, tls\n", "[policy] checks: expected tls before authres, "
                                          "since it reports every other check"),
    ("[policy]\nchecks = dmarc, spf, dkim\n", "[policy] checks: expected spf and dkim "
                                              "before dmarc, since it uses their results"),
    ("[policy]\nchecks = dmarc\n", "[policy] checks: expected spf and dkim in the chain"),
    ("[policy]\nchecks = dkim_sign, bcc\n", "[policy] checks: expected bcc before dkim_sign"),
    ("[dns]\nlifetime = 5\nbudget = 2\n", "[dns] budget: expected at least lifetime (5)"),
    ("[policy]\non_error = quarantine\n", "[policy] on_error: expected one of tempfail, "
                                          "accept, reject"),
    ("[policy]\nerror_reply = 550 5.7.1 no\n", "[policy] error_reply: expected an SMTP reply "
                                               "'4XX 4.X.X text'"),
    ("[policy]\nreject_reply = 550 4.7.1 mixed classes\n", "[policy] reject_reply: expected"),
    ("[check.tls]\nmin_version = TLS9\n", "[check.tls] min_version: expected one of SSLv3"),
    ("[check.tls]\nenabled = perhaps\n", "[check.tls] enabled: expected yes or no"),
    ("[check.tls]\naction = discard\n", "[check.tls] action: expected one of reject, "
                                        "tempfail, quarantine"),
    ("[check.tls]\nreply = 451 4.7.0 wrong class\n", "[check.tls] reply: expected an SMTP "
                                                     "reply '5XX"),
    ("[check.tls]\nrequire_domain = a.example\n", "[check.tls] require_domain: expected a "
                                                  "known key"),
    ("[check.trace]\naction = scramble\n", "[check.trace] action: expected remove or rewrite"),
    ("[check.authres]\ndirections = sideways\n", "[check.authres] directions: expected a list"),
    ("[check.spam]\nenabled = yes\n", "[check.spam]: unknown section"),
    ("[policy]\nquarantine = junk\n", "[policy] quarantine: expected one of hold, tag"),
    ("[check.dmarc]\nquarantine = junk\n", "[check.dmarc] quarantine: expected one of hold, tag"),
    ("[policy]\nquarantine_header = Subject\n", "[policy] quarantine_header: expected a header "
                                                "field name"),
    ("[policy]\nquarantine_header = X-Spam: yes\n", "[policy] quarantine_header: expected"),
    ("[policy]\nquarantine_header = " + "X" * 65 + "\n", "[policy] quarantine_header: expected"),
    ("[policy]\nquarantine_subject_tag = [SP\u00e4M]\n",
     "[policy] quarantine_subject_tag: expected printable ASCII"),
    ("[policy]\nquarantine_subject_tag = " + "x" * 33 + "\n",
     "[policy] quarantine_subject_tag: expected printable ASCII"),
    ("[milter\nsocket = x\n", "not a valid INI file"),
])
def test_errors_name_the_place(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(text, "test.ini")
    assert str(err.value).startswith("test.ini: ")
    assert expected in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.ini", REGISTRY)


def test_values_are_typed() -> None:
    cfg = loads(
        "[milter]\nsocket = unix:/run/mailward/milter.sock\ntimeout = 30s\n"
        "trusted_networks = 192.0.2.0/24 2001:db8::/32\nspool_threshold = 64K\n"
        "[metrics]\nlisten = [::1]:9100\n"
        "[policy]\nchecks = bcc, authres\non_error = accept\n"
        "[check.tls]\nenabled = no\n"
        "[check.bcc]\nmode = monitor\non_error = reject\n"
        "[check.trace]\naction = rewrite\n")
    assert cfg.milter.socket == "unix:/run/mailward/milter.sock"
    assert cfg.milter.timeout == 30.0
    assert cfg.milter.spool_threshold == 64 * 1024
    assert [str(n) for n in cfg.milter.trusted_networks] == ["192.0.2.0/24", "2001:db8::/32"]
    assert cfg.metrics.listen == ("::1", 9100)
    assert [link.name for link in cfg.chain] == ["bcc", "authres"]
    bcc = cfg.chain[0]
    assert (bcc.mode, bcc.on_error) == (Mode.MONITOR, Action.REJECT)
    assert cfg.chain[1].on_error is Action.ACCEPT  # inherited from [policy]
    assert cfg.warnings == ("[check.tls] is configured but not in [policy] checks",
                            "[check.trace] is configured but not in [policy] checks")


def test_global_monitor_wins_over_check_mode() -> None:
    cfg = loads("[milter]\nmode = monitor\n[check.tls]\nmode = enforce\n")
    assert {link.mode for link in cfg.chain} == {Mode.MONITOR}


def test_metrics_can_be_disabled() -> None:
    assert loads("[metrics]\nlisten =\n").metrics.listen is None


def test_reply_text_is_sanitised() -> None:
    reply = Reply.parse("550 5.7.1 bad\x00 \x1b[31mtext")
    assert reply.text == "bad [31mtext"


def quiet(text: str = "") -> config.Config:
    """`loads` with `text` added to a [milter] section that warns about nothing."""
    milter, _, rest = text.partition("\n[")
    return loads("[milter]\nauthserv_id = mx.example.com\nlocal_domains = example.com\n"
                 + milter + ("\n[" + rest if rest else ""))


def test_defaults_are_secure() -> None:
    """No TCP socket any local user could use, no network trusted without saying so."""
    cfg = quiet()
    assert cfg.milter.socket == "unix:/var/spool/postfix/mailward/milter.sock"
    assert cfg.milter.trusted_networks == ()
    assert cfg.metrics.listen == ("127.0.0.1", 9895)
    assert cfg.warnings == ()


def test_smallest_spool_threshold_is_accepted() -> None:
    assert quiet("spool_threshold = 1K\n").milter.spool_threshold == 1024


def test_spool_dir_is_an_existing_writable_directory(tmp_path: Path) -> None:
    assert quiet().milter.spool_dir == ""  # the system's temporary directory
    assert quiet(f"spool_dir = {tmp_path}\n").milter.spool_dir == str(tmp_path)
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "missing", tmp_path / "file", "relative/spool"):
        with pytest.raises(ConfigError) as err:
            quiet(f"spool_dir = {bad}\n")
        assert ("[milter] spool_dir: expected an absolute path to an existing directory we "
                f"may write to (empty: the system's temporary directory), got '{bad}'"
                ) in str(err.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("socket = inet:8895@127.0.0.1\n",
     "[milter] socket inet:8895@127.0.0.1 is TCP on loopback, so every local user can connect, "
     "speak the milter protocol and have mail judged or signed as if it came from the MTA; "
     "prefer unix:/var/spool/postfix/mailward/milter.sock (mode 0660, group postfix)"),
    ("socket = inet:8895@localhost\n", "is TCP on loopback, so every local user"),
    ("socket = inet6:8895@::1\n", "is TCP on loopback, so every local user"),
    ("socket = inet:8895@0.0.0.0\n",
     "[milter] socket inet:8895@0.0.0.0 is TCP beyond loopback, so every host that can reach "
     "it can connect"),
    ("socket = inet:8895@192.0.2.25\n", "is TCP beyond loopback"),
    ("socket = inet:8895@mx.example.com\n", "is TCP beyond loopback"),
    ("\n[metrics]\nlisten = 0.0.0.0:9895\n",
     "[metrics] listen 0.0.0.0:9895 is every address of this host: the metrics are exposed "
     "beyond loopback; use 127.0.0.1 or ::1 unless a firewall protects the port"),
    ("\n[metrics]\nlisten = [::]:9895\n", "[metrics] listen [::]:9895 is every address"),
])
def test_exposed_listeners_are_warned_about(text: str, expected: str) -> None:
    warnings = quiet(text).warnings
    assert len(warnings) == 1, warnings
    assert expected in warnings[0]


@pytest.mark.parametrize("text", [
    "socket = unix:/run/mailward/milter.sock\n",
    "socket = local:/run/mailward/milter.sock\n",
    "\n[metrics]\nlisten = 127.0.0.1:9895\n",
    "\n[metrics]\nlisten = [::1]:9895\n",
    "\n[metrics]\nlisten = 192.0.2.25:9895\n",  # one interface: a deliberate choice
    "\n[metrics]\nlisten =\n",
])
def test_private_listeners_are_not_warned_about(text: str) -> None:
    assert quiet(text).warnings == ()


def test_a_chain_of_disabled_checks_is_warned_about() -> None:
    cfg = loads("[policy]\nchecks = bcc\n[check.bcc]\nenabled = no\n")
    assert cfg.chain == ()
    assert cfg.warnings == ("[policy] checks: every listed check is disabled (enabled = no): "
                            "mail passes unchecked",)


def test_quarantine_per_check_defaults_to_the_policy() -> None:
    cfg = loads("[policy]\nquarantine = tag\nquarantine_subject_tag = [SPAM]\n"
                "[check.tls]\nquarantine = hold\n")
    modes = {link.name: link.quarantine for link in cfg.chain}
    assert modes["tls"] is Quarantine.HOLD and modes["dmarc"] is Quarantine.TAG
    assert (cfg.policy.quarantine_header, cfg.policy.quarantine_subject_tag) == (
        "X-Mailward-Quarantine", "[SPAM]")
