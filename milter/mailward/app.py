"""Build everything once and run the milter: config, services snapshot, metrics, signals.

Signals (libmilter facts in DESIGN.md): HUP/TERM/INT/USR1 are blocked before any thread
starts, so every thread inherits the mask; libmilter's own signal thread then `sigwait`s
TERM/INT/HUP and stops gracefully, and our reload thread `sigwait`s USR1.

Reload builds the next services snapshot from the new config and the running one (keeping the
resolver's cache and the rate-limit windows where nothing changed) and replaces the reference
in one assignment: connections already open finish with the snapshot they started with. A bad
config on reload is logged and the running one kept.
"""

from __future__ import annotations

import logging
import signal
import threading

from mailward.adapter.milter import ServeError, serve
from mailward.checks import REGISTRY
from mailward.core import config as configmod
from mailward.core import snapshot as snapshotmod
from mailward.core.check import Registry
from mailward.core.config import Config
from mailward.core.snapshot import Snapshot
from mailward.errors import ConfigError, MailwardError
from mailward.services import watchdog
from mailward.services.metrics import Metrics
from mailward.services.sdnotify import Notifier

log = logging.getLogger(__name__)

BLOCKED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


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
        self._watchdog: threading.Event | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

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
            if (new.milter.socket, new.metrics.listen) != (old.config.milter.socket,
                                                           old.config.metrics.listen):
                log.warning("reload: [milter] socket and [metrics] listen take effect on "
                            "restart")
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

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT/SIGHUP."""
        cfg = self.config
        self.setup_warnings()
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        threading.Thread(target=self._reload_loop, name="reload", daemon=True).start()
        if cfg.metrics.listen is not None:
            host, port = cfg.metrics.listen
            try:
                self.metrics.serve(host, port)
            except OSError as exc:
                raise MailwardError(f"[metrics] listen {host}:{port}: {exc.strerror}") from None
            log.info("metrics on http://%s:%d/metrics", host, port)
        checks = ", ".join(f"{link.name}({link.mode})" for link in cfg.chain)
        log.info("mailward listening on %s, checks: %s", cfg.milter.socket, checks or "none")
        try:
            serve(self, socket=cfg.milter.socket, timeout=int(cfg.milter.timeout),
                  on_ready=self._ready)
        except ServeError as exc:
            raise MailwardError(f"[milter] socket {cfg.milter.socket}: {exc}") from None
        finally:
            if self._watchdog is not None:
                self._watchdog.set()
        self.notifier.stopping()
        log.info("mailward stopped")
