"""Services as one snapshot: what the configuration determines, built together, swapped as one.

A `Snapshot` holds the config (settings, chain, loaded keys and maps), the resolver and the
rate-limit store. `build` makes one; on reload the application builds the next from the new
config and the running snapshot, and replaces its reference in one assignment. A connection
takes the snapshot current when it opens and uses it until it closes, so one message never
pairs an old config with a new resolver.

What must outlive a reload is carried over, never reset:
- the resolver (and so its DNS cache) while `[dns]` is unchanged;
- the rate-limit store while its `StoreSpec` is unchanged (in-memory windows survive);
- Prometheus metrics: every snapshot holds the same `Metrics` (checks count through it).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailward.core.config import Config
from mailward.services.dns import Resolver, install_pyspf
from mailward.services.metrics import Metrics
from mailward.services.ratestore import RateStore, StoreSpec, open_store


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One generation of configuration-determined services (1, 2, … per process)."""

    generation: int
    config: Config
    resolver: Resolver
    rates: RateStore
    metrics: Metrics | None = None  # not part of a generation: the same object throughout

    def setup_warnings(self) -> list[str]:
        """What the chain's checks find wrong with the world (e.g. unpublished DKIM keys)."""
        return [w for link in self.config.chain for w in link.setup_warnings(self.resolver)]


def store_spec(config: Config) -> StoreSpec:
    """The rate-limit store the chain asks for (the first check that names one)."""
    specs = [spec for link in config.chain if (spec := link.rate_store()) is not None]
    return specs[0] if specs else StoreSpec()


def build(config: Config, *, metrics: Metrics | None = None,
          previous: Snapshot | None = None) -> Snapshot:
    """The snapshot for `config`, reusing what `previous` holds where nothing changed."""
    install_pyspf()  # idempotent: pyspf's one global finds each transaction's resolver
    if previous is not None and previous.config.dns == config.dns:
        resolver = previous.resolver
    else:
        resolver = Resolver(config.dns, metrics=metrics)
    spec = store_spec(config)
    if previous is not None and previous.rates.spec == spec:
        rates = previous.rates
    else:
        rates = open_store(spec, metrics=metrics)
    generation = previous.generation + 1 if previous is not None else 1
    return Snapshot(generation, config, resolver, rates, metrics)
