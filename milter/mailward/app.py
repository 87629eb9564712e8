"""Build everything once and run the milter: config, metrics, signals, reload.

Signals (libmilter facts in DESIGN.md): HUP/TERM/INT/USR1 are blocked before any thread
starts, so every thread inherits the mask; libmilter's own signal thread then `sigwait`s
TERM/INT/HUP and stops gracefully, and our reload thread `sigwait`s USR1. A bad config on
reload is logged and the running one kept.
"""

from __future__ import annotations

import logging
import signal
import threading

from mailward import config as configmod
from mailward.adapter import ServeError, serve
from mailward.config import Config
from mailward.counters import Counters, MemoryCounters
from mailward.counters import from_settings as counters_from
from mailward.dns import DnsError, Resolver
from mailward.errors import ConfigError, MailwardError
from mailward.metrics import Metrics

log = logging.getLogger(__name__)

BLOCKED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


class App:
    """The running application: holds the current config; reload swaps it atomically."""

    def __init__(self, path: str, *, metrics: Metrics | None = None) -> None:
        self.path = path
        self._config = configmod.load(path)
        self.metrics = metrics if metrics is not None else Metrics()
        self._resolver = Resolver(self._config.dns, metrics=self.metrics)
        self._resolver.install()
        self._counters = self._make_counters(self._config)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    @property
    def counters(self) -> Counters:
        return self._counters

    def _make_counters(self, config: Config) -> Counters:
        link = next((li for li in config.chain if li.name == "ratelimit"), None)
        if link is None:
            return MemoryCounters(metrics=self.metrics)
        return counters_from(link.settings, metrics=self.metrics)

    def reload(self) -> bool:
        """Load the config file again; keep the running config when the new one is bad."""
        try:
            new = configmod.load(self.path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.metrics.config_reloads.labels(outcome="failed").inc()
            return False
        old = self._config
        if (new.milter.socket, new.metrics.listen) != (old.milter.socket, old.metrics.listen):
            log.warning("reload: [milter] socket and [metrics] listen take effect on restart")
        for warning in new.warnings:
            log.warning("%s", warning)
        if new.dns != old.dns:
            self._resolver = Resolver(new.dns, metrics=self.metrics)
            self._resolver.install()
        old_rl = next((li.settings for li in old.chain if li.name == "ratelimit"), None)
        new_rl = next((li.settings for li in new.chain if li.name == "ratelimit"), None)
        if (getattr(old_rl, "backend", None), getattr(old_rl, "redis_url", None)) != (
                getattr(new_rl, "backend", None), getattr(new_rl, "redis_url", None)):
            self._counters = self._make_counters(new)
        self._config = new
        logging.getLogger().setLevel(new.milter.log_level.upper())
        self.metrics.config_reloads.labels(outcome="ok").inc()
        self.check_published_keys()
        log.info("configuration reloaded from %s", self.path)
        return True

    def check_published_keys(self) -> list[str]:
        """Warn (and return why) for signing keys that DNS does not publish as configured."""
        from mailward.keys import published_key

        warnings = []
        for link in self._config.chain:
            for key in getattr(link.settings, "loaded", ()):
                name = f"{key.selector}._domainkey.{key.domain}"
                try:
                    records = self._resolver.txt(name)
                except DnsError as exc:
                    warnings.append(f"dkim_sign: cannot check {name} in DNS: {exc}")
                    continue
                if not any(published_key(r) == key.public for r in records):
                    warnings.append(f"dkim_sign: the key {key.path} does not match the record "
                                    f"at {name} ({'none' if not records else 'different'}); "
                                    "signatures will not verify")
        for warning in warnings:
            log.warning("%s", warning)
        return warnings

    def _reload_loop(self) -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            self.reload()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT/SIGHUP."""
        cfg = self._config
        self.check_published_keys()
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
            serve(self, socket=cfg.milter.socket, timeout=int(cfg.milter.timeout))
        except ServeError as exc:
            raise MailwardError(f"[milter] socket {cfg.milter.socket}: {exc}") from None
        log.info("mailward stopped")
