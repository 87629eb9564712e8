"""Build everything once and run the milter: config, services snapshot, metrics, signals.

Signals (libmilter facts in DESIGN.md): libmilter's own signal thread `sigwait`s TERM/INT/HUP
and then stops serving every connection at once, dropping the transactions in flight. So
libmilter runs in a thread of its own that blocks those signals (as does every thread started
from it), while the main thread leaves them unblocked with a handler: Linux delivers a signal
sent to the process to its main thread first when that thread does not block it, so the
handler sees the stop and libmilter's thread does not. The handler starts a graceful stop
(adapter/drain.py): new transactions are refused with 421, those open may finish within
`[milter] stop_grace`, then libmilter is stopped. A second signal stops at once. SIGUSR1 is
blocked everywhere and taken by the reload thread's `sigwait`.

Reload builds the next services snapshot from the new config and the running one (keeping the
resolver's cache and the rate-limit windows where nothing changed) and replaces the reference
in one assignment: connections already open finish with the snapshot they started with. A bad
config on reload is logged and the running one kept.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from mailward.adapter.drain import Drain
from mailward.adapter.milter import Libmilter, ServeError
from mailward.checks import REGISTRY
from mailward.core import config as configmod
from mailward.core import snapshot as snapshotmod
from mailward.core.check import Registry
from mailward.core.config import Config
from mailward.core.snapshot import Snapshot
from mailward.errors import ConfigError, MailwardError
from mailward.reports.hooks import Reporting
from mailward.services import watchdog
from mailward.services.metrics import Metrics
from mailward.services.sdnotify import Notifier

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
BLOCKED = {*STOP_SIGNALS, signal.SIGUSR1}

# glibc's mallopt parameter M_ARENA_MAX (malloc.h), and the arenas the milter keeps, by engine:
# the asyncio engine allocates in one thread (its workers mostly wait for DNS), libmilter in a
# thread per connection
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
ENGINE_ARENAS = {"asyncio": 1, "libmilter": MALLOC_ARENAS}


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (the environment's MALLOC_ARENA_MAX, if set, wins).

    glibc gives threads that allocate at the same time arenas of their own, up to 8 per CPU;
    libmilter runs a thread per connection, so under load each arena keeps its own free
    memory: 2 MiB of peak RSS at 8 and 32 sessions (bench/README.md), no CPU cost measured.
    The asyncio engine keeps one: 0.6 MiB less than two, CPU unchanged (bench/README.md).
    Returns whether the cap was set (False on another libc, or when the environment says)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        import ctypes  # noqa: PLC0415 (only here: 0.4 MiB that nothing else needs)

        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


class Engine(Protocol):
    """What serves the milter socket: libmilter's threads, or our asyncio loop."""

    def serve(self, on_ready: Callable[[], None] | None = None) -> None: ...

    def stop(self) -> None: ...


class App:
    """The running application: holds the current snapshot; reload replaces it as one."""

    def __init__(self, path: str, *, metrics: Metrics | None = None,
                 registry: Registry = REGISTRY) -> None:
        self.path = path
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics()
        self._snapshot = snapshotmod.build(configmod.load(path, registry), metrics=self.metrics)
        self._reload_lock = threading.Lock()
        self.notifier = Notifier()
        self.drain = Drain()
        self._reports: Reporting | None = None
        self._watchdog: threading.Event | None = None
        self._stop_signals = 0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def reports(self) -> Reporting | None:
        """The report store's hooks, once `run` has opened it ([reports] store)."""
        return self._reports

    @property
    def config(self) -> Config:
        return self._snapshot.config

    def reload(self) -> bool:
        """Load the config file again; keep the running snapshot when the new one is bad.

        systemd hears RELOADING=1 before and READY=1 after, whatever the outcome.
        """
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready()

    def _reload(self) -> bool:
        with self._reload_lock:
            try:
                new = configmod.load(self.path, self.registry)
            except ConfigError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                self.metrics.config_reloads.labels(outcome="failed").inc()
                return False
            old = self._snapshot
            if ((new.milter.socket, new.milter.engine, new.metrics.listen)
                    != (old.config.milter.socket, old.config.milter.engine,
                        old.config.metrics.listen)):
                log.warning("reload: [milter] socket and engine and [metrics] listen take "
                            "effect on restart")
            for warning in new.warnings:
                log.warning("%s", warning)
            self._snapshot = snapshotmod.build(new, metrics=self.metrics, previous=old)
            logging.getLogger().setLevel(new.milter.log_level.upper())
            self.metrics.config_reloads.labels(outcome="ok").inc()
            self.setup_warnings()
            log.info("configuration reloaded from %s (generation %d)", self.path,
                     self._snapshot.generation)
            return True

    def setup_warnings(self) -> list[str]:
        """Log (and return) what the chain's checks find wrong with the world."""
        warnings = self._snapshot.setup_warnings()
        for warning in warnings:
            log.warning("%s", warning)
        return warnings

    def _reload_loop(self) -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            self.reload()

    def _ready(self) -> None:
        """The socket is open: tell systemd, and start the watchdog if it asked for one."""
        self.notifier.ready()
        period = watchdog.interval()
        if period is not None and self.notifier.enabled:
            log.info("watchdog: probing %s every %.1fs", self.config.milter.socket, period / 4)
            self._watchdog = watchdog.start(self.config.milter.socket, self.notifier, period)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signals += 1

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT/SIGHUP, then stop gracefully."""
        cfg = self.config
        limit_malloc_arenas(ENGINE_ARENAS[cfg.milter.engine])  # before the first thread
        self.setup_warnings()
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        # Threads inherit the mask: block everything before starting any, then unblock the
        # stop signals for this (the main) thread alone.
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        threading.Thread(target=self._reload_loop, name="reload", daemon=True).start()
        if cfg.metrics.listen is not None:
            host, port = cfg.metrics.listen
            try:
                self.metrics.serve(host, port)
            except OSError as exc:
                raise MailwardError(f"[metrics] listen {host}:{port}: {exc.strerror}") from None
            log.info("metrics on http://%s:%d/metrics", host, port)
        # a store that cannot be opened is retried in the background: mail matters more
        # than the reports about it (reports/hooks.py)
        self._reports = Reporting.start(cfg.reports, self.metrics)
        checks = ", ".join(f"{link.name}({link.mode})" for link in cfg.chain)
        log.info("mailward listening on %s (engine %s), checks: %s", cfg.milter.socket,
                 cfg.milter.engine, checks or "none")
        failure: list[ServeError] = []
        engine = self._engine()

        def milter() -> None:
            try:
                engine.serve(on_ready=self._ready)
            except ServeError as exc:
                failure.append(exc)

        thread = threading.Thread(target=milter, name=cfg.milter.engine)
        thread.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            while thread.is_alive() and not self._stop_signals:
                thread.join(0.5)  # the stop handler runs in this thread, between waits
            if thread.is_alive():
                self._stop(engine)
            thread.join()
        finally:
            if self._watchdog is not None:
                self._watchdog.set()
        if self._reports is not None:
            self._reports.close()  # what is queued is written
        if failure:
            raise MailwardError(f"[milter] socket {cfg.milter.socket}: {failure[0]}")
        self.notifier.stopping()
        log.info("mailward stopped")

    def _engine(self) -> Engine:
        """The milter protocol engine `[milter] engine` names."""
        cfg = self.config.milter
        if cfg.engine == "libmilter":
            return Libmilter(self, socket=cfg.socket, timeout=cfg.timeout)
        from mailward.adapter import aio  # noqa: PLC0415 (asyncio: only when used)

        return aio.Engine(self, socket=cfg.socket, timeout=cfg.timeout)

    def _stop(self, engine: Engine) -> None:
        """Refuse new transactions, wait for the open ones (up to stop_grace, or until a
        second stop signal), then stop the engine."""
        self.notifier.stopping()
        self.drain.close()
        grace = self._snapshot.config.milter.stop_grace
        log.info("stopping: %d transaction(s) in flight, waiting up to %gs for them",
                 self.drain.open, grace)
        started = time.monotonic()
        deadline = started + grace
        left = self.drain.open
        while left and self._stop_signals < 2 and time.monotonic() < deadline:
            left = self.drain.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        if left:
            log.warning("stopping with %d transaction(s) still open after %.1fs: the MTA "
                        "tempfails them (milter_default_action)", left,
                        time.monotonic() - started)
        else:
            log.info("stopping: no transaction in flight (%.1fs)", time.monotonic() - started)
        engine.stop()
