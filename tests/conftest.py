"""Shared test helpers. In CI (CI=true) a missing Postfix is a failure, never a skip."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mailward import config
from mailward.labdns import Nameserver
from mailward.transaction import Stage, Tls, Transaction, index_headers

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def need(condition: bool, why: str) -> None:
    """Skip outside CI when a real component is missing; fail in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {why}: .ci/run must install it", pytrace=False)
    pytest.skip(why)


def make_config(text: str = "") -> config.Config:
    """A config for pure tests: no check that needs DNS unless `text` lists the checks."""
    base = "[milter]\nauthserv_id = mx.example.com\ntrusted_networks = 10.0.0.0/8\n"
    if text.lstrip().startswith("[milter]"):
        base = ""
    if "[policy]" not in text:
        base += "[policy]\nchecks = tls, bcc, trace, authres\n"
    return config.loads(base + text)


def make_tx(*, stage: Stage = Stage.EOM, headers: list[tuple[str, str]] | None = None,
            tls: str = "", **kw: object) -> Transaction:
    import ipaddress

    ip = kw.pop("client_ip", "203.0.113.9")
    return Transaction(stage=stage, client_ip=ipaddress.ip_address(ip) if ip else None,
                       tls=Tls(tls, "TLS_AES_256_GCM_SHA384", "256") if tls else None,
                       headers=index_headers(headers or []), **kw)  # type: ignore[arg-type]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test hides a missing feature or install step: fail the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if IN_CI and skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter:
            reporter.write_line(f"CI=true: {skipped} test(s) skipped; that fails the run",
                                red=True)


@pytest.fixture(scope="session")
def _nameserver() -> Iterator[Nameserver]:
    server = Nameserver()
    yield server
    server.close()


@pytest.fixture
def nameserver(_nameserver: Nameserver) -> Nameserver:
    """The loopback DNS server, emptied for this test."""
    _nameserver.clear()
    return _nameserver


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on 127.0.0.1 (Debian's redis-server), for the session."""
    import shutil
    import subprocess

    from mailward.lab import free_port, wait_for_port

    need(shutil.which("redis-server") is not None,
         "redis-server is missing: apt-get install redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
