"""Shared test helpers. In CI (CI=true) a missing Postfix is a failure, never a skip."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from mailward.checks import REGISTRY
from mailward.core import config, pipeline
from mailward.core.check import Context
from mailward.core.snapshot import Snapshot, build
from mailward.core.transaction import Stage, Tls, Transaction, index_headers
from mailward.core.verdict import CheckResult
from mailward.lab.dns import Nameserver
from mailward.lab.postfix import free_port, wait_for_port
from mailward.services.dns import Budget, Resolver
from mailward.services.ratestore import RateStore

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")

# Property tests: in the suite, a modest number of examples and a deadline that only catches
# hangs (10 s of wall clock: a loaded CI machine stalls a process for a second now and then,
# and Hypothesis fails an example over its deadline even when its rerun is fast); `make fuzz`
# (MAILWARD_FUZZ=1) runs many more, each input within 50 ms.
settings.register_profile("suite", max_examples=150, deadline=10_000, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20000, deadline=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fuzz" if os.environ.get("MAILWARD_FUZZ", "") not in ("", "0")
                      else "suite")


def need(condition: bool, why: str) -> None:
    """Skip outside CI when a real component is missing; fail in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {why}: .ci/run must install it", pytrace=False)
    pytest.skip(why)


def make_config(text: str = "") -> config.Config:
    """A config for pure tests: no check that needs DNS unless `text` lists the checks."""
    base = ("[milter]\nsocket = unix:/run/mailward-test/milter.sock\n"
            "authserv_id = mx.example.com\ntrusted_networks = 10.0.0.0/8\n")
    if text.lstrip().startswith("[milter]"):
        base = ""
    if "[policy]" not in text:
        base += "[policy]\nchecks = tls, bcc, trace, authres\n"
    return config.loads(base + text, REGISTRY)


def loads(text: str, path: str = "<string>") -> config.Config:
    """`config.loads` with the application's registry."""
    return config.loads(text, REGISTRY, path)


def snapshot_of(cfg: config.Config | Snapshot, *, resolver: Resolver | None = None,
                rates: RateStore | None = None) -> Snapshot:
    """A services snapshot for `cfg`, with the given resolver or rate store if any."""
    snap = cfg if isinstance(cfg, Snapshot) else build(cfg)
    return dataclasses.replace(snap, resolver=resolver or snap.resolver,
                               rates=rates or snap.rates)


def run_stage(cfg: config.Config | Snapshot, stage: Stage, tx: Transaction, *,
              resolver: Resolver | None = None, rates: RateStore | None = None
              ) -> tuple[Transaction, tuple[CheckResult, ...]]:
    """Drive one stage through the core entry point; the transaction and every result."""
    tx, verdict = pipeline.evaluate(stage, tx, snapshot_of(cfg, resolver=resolver,
                                                             rates=rates))
    return tx, verdict.results


def run_check(cfg: config.Config | Snapshot, name: str, tx: Transaction,
              results: tuple[CheckResult, ...] = ()) -> CheckResult:
    """Run one check of the chain on `tx` (direction classified), after `results`."""
    snap = snapshot_of(cfg)
    link = next(li for li in snap.config.chain if li.name == name)
    tx = pipeline.evaluate(tx.stage, tx, snap)[0]  # classify direction as the pipeline does
    ctx = Context(site=snap.config.milter, dns=snap.resolver.bind(Budget(60)),
                  rates=snap.rates, results=results)
    return pipeline.run_link(link, tx, ctx)


def make_tx(*, stage: Stage = Stage.EOM, headers: list[tuple[str, str]] | None = None,
            tls: str = "", **kw: object) -> Transaction:
    ip = kw.pop("client_ip", "203.0.113.9")
    return Transaction(stage=stage, client_ip=ipaddress.ip_address(str(ip)) if ip else None,
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


POSTGRES_BIN = "/usr/lib/postgresql/15/bin"


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A private PostgreSQL cluster (Debian's postgresql 15) on 127.0.0.1, for the session:
    initdb into a temporary directory and pg_ctl, run as the postgres user."""
    need(os.path.exists(f"{POSTGRES_BIN}/initdb"), "postgresql is missing: apt-get install "
         "postgresql")
    need(os.geteuid() == 0, "starting PostgreSQL as its own user needs root")
    root = tempfile.mkdtemp(prefix="mailward-pg-")
    shutil.chown(root, "postgres")
    data = os.path.join(root, "data")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=120)

    as_postgres(f"{POSTGRES_BIN}/initdb", "-D", data, "--auth=trust", "-U", "postgres",
                "--no-sync")
    as_postgres(f"{POSTGRES_BIN}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w",
                "-o", f"-c listen_addresses=127.0.0.1 -c port={port} "
                f"-c unix_socket_directories={root} -c fsync=off", "start")
    try:
        as_postgres(f"{POSTGRES_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "mailward")
        yield f"postgresql://postgres@127.0.0.1:{port}/mailward"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{POSTGRES_BIN}/pg_ctl", "-D",
                        data, "-m", "fast", "-w", "stop"], check=False, capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)
