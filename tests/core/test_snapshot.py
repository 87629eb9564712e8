"""Services as one snapshot: built together, swapped as one, carrying over what must survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailward.app import App
from mailward.core.snapshot import build, store_spec
from mailward.services.metrics import Metrics
from mailward.services.ratestore import MemoryStore, RedisStore, StoreSpec
from tests.conftest import make_config

LIMITS = "[check.ratelimit]\nlimits = outbound user messages 5\n"
CHAIN = "[policy]\nchecks = ratelimit, authres\n"


def test_rebuilding_keeps_resolver_and_windows_when_their_settings_do_not_change() -> None:
    first = build(make_config(CHAIN + LIMITS))
    first.rates.add(["k"], 3, 3600)
    again = build(make_config(CHAIN + LIMITS + "[check.authres]\ndirections = inbound\n"),
                  previous=first)
    assert again.generation == first.generation + 1
    assert again.resolver is first.resolver  # and with it the DNS cache
    assert again.rates is first.rates
    assert again.rates.add(["k"], 1, 3600) == [4]  # the window was not reset
    assert again.config is not first.config


def test_changed_dns_settings_make_a_new_resolver_but_keep_the_windows() -> None:
    first = build(make_config(CHAIN + LIMITS))
    changed = build(make_config(CHAIN + LIMITS + "[dns]\ntimeout = 1\n"), previous=first)
    assert changed.resolver is not first.resolver
    assert changed.resolver.settings.timeout == 1
    assert changed.rates is first.rates


def test_the_store_follows_its_spec(redis_url: str) -> None:
    memory = build(make_config(CHAIN + LIMITS))
    assert isinstance(memory.rates, MemoryStore) and memory.rates.spec == StoreSpec()
    redis_cfg = make_config(CHAIN + LIMITS + f"backend = redis\nredis_url = {redis_url}\n")
    assert store_spec(redis_cfg) == StoreSpec("redis", redis_url, 0.5)
    shared = build(redis_cfg, previous=memory)
    assert isinstance(shared.rates, RedisStore)
    assert build(redis_cfg, previous=shared).rates is shared.rates
    back = build(make_config(CHAIN + LIMITS), previous=shared)
    assert isinstance(back.rates, MemoryStore)


def test_no_rate_limit_check_still_gives_a_store() -> None:
    snap = build(make_config())
    assert snap.rates.spec == StoreSpec()


def write(path: Path, authserv_id: str, extra: str = "") -> None:
    path.write_text(f"[milter]\nauthserv_id = {authserv_id}\n{CHAIN}{LIMITS}{extra}")


def test_app_reload_swaps_the_snapshot_as_one_and_keeps_metrics(tmp_path: Path) -> None:
    ini = tmp_path / "m.ini"
    write(ini, "one.example")
    metrics = Metrics()
    app = App(str(ini), metrics=metrics)
    old = app.snapshot
    old.rates.add(["user"], 2, 3600)
    write(ini, "two.example", "[dns]\ntimeout = 1\n")
    assert app.reload()
    new = app.snapshot
    assert (new.generation, new.config.milter.authserv_id) == (2, "two.example")
    assert new.resolver is not old.resolver and new.resolver.settings.timeout == 1
    assert new.rates is old.rates and new.rates.add(["user"], 1, 3600) == [3]
    assert app.metrics is metrics
    # what a connection pinned is untouched: old config with old resolver, together
    assert (old.config.milter.authserv_id, old.resolver.settings.timeout) == ("one.example", 2)
    assert metrics.registry.get_sample_value("mailward_config_reloads_total",
                                             {"outcome": "ok"}) == 1


@pytest.mark.expect_log_errors
def test_a_bad_reload_keeps_the_running_snapshot(tmp_path: Path) -> None:
    ini = tmp_path / "m.ini"
    write(ini, "one.example")
    app = App(str(ini))
    running = app.snapshot
    ini.write_text("[milter]\nsocket = nonsense\n")
    assert not app.reload()
    assert app.snapshot is running
