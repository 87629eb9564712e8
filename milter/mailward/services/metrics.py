"""Prometheus metrics, held by one `Metrics` object on its own registry (no module state).

Labels are bounded: check names, result words, verdicts and stages; never addresses.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mailward import __version__

# Label values known in advance (tests/services/test_metrics.py holds them to the core's enums).
DIRECTIONS = ("inbound", "outbound", "internal")
VERDICTS = ("accept", "reject", "tempfail", "discard", "quarantine")
DMARC_POLICIES = ("none", "quarantine", "reject")
REPORT_ROWS = ("queued", "dropped", "error")
REPORTS_INGESTED = ("accepted", "duplicate", "rejected", "bomb", "dropped", "error")
# the adapter's callbacks, and "protocol": a malformed packet from the MTA (adapter/aio.py)
STAGES = ("connect", "helo", "mail", "rcpt", "header", "body", "eom", "abort", "close",
          "protocol")


class Metrics:
    """Every metric mailward exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter("mailward_messages", "Messages by direction (inbound, "
                                "outbound, internal) and final verdict.",
                                ["direction", "verdict"], registry=r)
        self.dmarc_failures = Counter(
            "mailward_dmarc_failures", "DMARC failures by the policy applied to them (none, "
            "quarantine, reject; none also when a trusted ARC sealer's results overrode it).",
            ["policy"], registry=r)
        self.recipients_rejected = Counter(
            "mailward_recipients_rejected", "Recipients refused before DATA, by check.",
            ["check"], registry=r)
        self.check_results = Counter("mailward_check_results", "Check results.",
                                     ["check", "result"], registry=r)
        self.monitor_actions = Counter(
            "mailward_monitor_actions", "Actions a check in monitor mode would have taken.",
            ["check", "action"], registry=r)
        self.check_duration = Histogram(
            "mailward_check_duration_seconds", "Time spent in each check.", ["check"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self._check_timers: dict[str, Any] = {}
        self._check_counts: dict[tuple[str, str], Any] = {}
        self.connections_active = Gauge("mailward_connections_active",
                                        "MTA connections being served.", registry=r)
        self.errors = Counter("mailward_errors", "Unexpected errors, by protocol stage.",
                              ["stage"], registry=r)
        self.dns_queries = Counter("mailward_dns_queries", "DNS lookups by outcome "
                                   "(ok, cached, nxdomain, nodata, timeout, servfail; budget: the "
                                   "message's DNS time was used up; badname: not a DNS name, "
                                   "never asked).",
                                   ["rtype", "outcome"], registry=r)
        self.dns_duration = Histogram(
            "mailward_dns_duration_seconds", "Time of DNS lookups that reached a server.",
            ["rtype"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                5, 10), registry=r)
        self.ratelimit_hits = Counter("mailward_ratelimit_hits", "Rate limits exceeded, by key "
                                      "kind (never by value).",
                                      ["direction", "kind", "measure"], registry=r)
        self.ratelimit_backend_errors = Counter(
            "mailward_ratelimit_backend_errors", "Rate-limit counter store failures: Redis "
            "errors, and keys the in-memory store had no room for (each counted as this event "
            "alone).", registry=r)
        self.arc_overrides = Counter(
            "mailward_arc_overrides", "DMARC failures accepted on the word of a trusted ARC "
            "sealer, by sealer (a domain of [check.arc] trusted_sealers).", ["sealer"],
            registry=r)
        self.config_reloads = Counter("mailward_config_reloads", "Configuration reloads.",
                                      ["outcome"], registry=r)
        self.report_rows = Counter(
            "mailward_report_rows", "DMARC outcomes for aggregate reports: queued, dropped "
            "(the queue was full) and error (the store refused a batch).", ["outcome"],
            registry=r)
        self.reports_ingested = Counter(
            "mailward_reports_ingested", "Aggregate reports taken from report mail: accepted, "
            "duplicate, rejected (malformed), bomb (decompression past the limit), dropped "
            "(the inbox was full) and error.", ["outcome"], registry=r)
        self.build_info = Gauge("mailward_build_info", "Build information.", ["version"],
                                registry=r)
        self.build_info.labels(version=__version__).set(1)
        # Series that dashboards and alerts divide or compare exist from the start, at 0,
        # rather than appearing with their first event.
        for direction in DIRECTIONS:
            for verdict in VERDICTS:
                self.messages.labels(direction=direction, verdict=verdict)
        for policy in DMARC_POLICIES:
            self.dmarc_failures.labels(policy=policy)
        for stage in STAGES:
            self.errors.labels(stage=stage)
        for outcome in ("ok", "failed"):
            self.config_reloads.labels(outcome=outcome)
        for outcome in REPORT_ROWS:
            self.report_rows.labels(outcome=outcome)
        for outcome in REPORTS_INGESTED:
            self.reports_ingested.labels(outcome=outcome)

    def observe_check(self, check: str, seconds: float) -> None:
        """One check's time: its histogram child looked up once per name, not per message
        (prometheus-client's `labels` validates and locks on every call)."""
        child = self._check_timers.get(check)
        if child is None:
            child = self._check_timers.setdefault(check, self.check_duration.labels(check=check))
        child.observe(seconds)

    def count_result(self, check: str, result: str) -> None:
        """One check result, with the counter child cached likewise."""
        child = self._check_counts.get((check, result))
        if child is None:
            child = self._check_counts.setdefault(
                (check, result), self.check_results.labels(check=check, result=result))
        child.inc()

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port in a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)


STS_ANSWERS = ("secure", "dane", "testing", "none", "nopolicy", "notadomain", "temp")
STS_FETCHES = ("ok", "dns_error", "private_address", "connect_error", "tls_error",
               "http_error", "timeout", "too_large", "invalid")
STS_REFRESHES = ("unchanged", "refetched", "failed", "dropped")


class StsMetrics:
    """The metrics of `mailward sts run`, the MTA-STS policy service (its own process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookups = Counter(
            "mailward_sts_lookups", "Postfix TLS-policy lookups by answer: secure (an enforce "
            "policy), dane (validated TLSA: dane-only), testing and none (policies that ask "
            "nothing of Postfix), nopolicy, notadomain (keys MTA-STS has nothing to say "
            "about) and temp (the service could not answer; Postfix defers).",
            ["answer"], registry=r)
        self.fetches = Counter("mailward_sts_fetches", "HTTPS policy fetches by outcome.",
                               ["outcome"], registry=r)
        self.refreshes = Counter(
            "mailward_sts_refreshes", "Background checks of cached policies: unchanged, "
            "refetched (a new id, or half of max_age gone), failed (the cached policy stays) "
            "and dropped (expired).", ["outcome"], registry=r)
        self.cache_policies = Gauge("mailward_sts_cache_policies",
                                    "Policies in the cache at the last count.", registry=r)
        self.dns_queries = Counter("mailward_sts_dns_queries", "DNS lookups of the policy "
                                   "service by outcome.", ["rtype", "outcome"], registry=r)
        self.dns_duration = Histogram(
            "mailward_sts_dns_duration_seconds", "Time of the policy service's DNS lookups "
            "that reached a server.", ["rtype"],
            buckets=(0.001, 0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10), registry=r)
        self.build_info = Gauge("mailward_sts_build_info", "Build information.", ["version"],
                                registry=r)
        self.build_info.labels(version=__version__).set(1)
        for answer in STS_ANSWERS:
            self.lookups.labels(answer=answer)
        for outcome in STS_FETCHES:
            self.fetches.labels(outcome=outcome)
        for outcome in STS_REFRESHES:
            self.refreshes.labels(outcome=outcome)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
