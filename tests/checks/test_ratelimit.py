"""Rate limits on the in-process and the Redis counter stores (a real redis-server)."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest
import redis

from mailward.core import policy
from mailward.core.transaction import Stage
from mailward.core.verdict import Action, Result
from mailward.errors import ConfigError
from mailward.lab.postfix import free_port
from mailward.services.metrics import Metrics
from mailward.services.ratestore import MemoryStore, RedisStore
from tests.conftest import loads, make_config, make_tx, run_stage

LIMITS = """[policy]
checks = ratelimit
[check.ratelimit]
window = 60
limits =
    outbound user messages 3
    outbound user recipients 5
    inbound network messages 2
    inbound domain recipients 4
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def attempt(cfg_text: str, counters: Any, stage: Stage = Stage.MAIL, **tx: Any
            ) -> tuple[Result, Action, str]:
    cfg = make_config(cfg_text)
    _, (r,) = run_stage(cfg, stage, make_tx(stage=stage, **tx), rates=counters)
    v = policy.decide((r,), cfg.policy, final=False)
    return r.result, v.action, str(v.reply) if v.reply else ""


REFUSED = (Result.FAIL, Action.TEMPFAIL, "450 4.7.1 Rate limit exceeded, try again later")


def test_messages_per_user_and_window() -> None:
    clock, metrics = Clock(), Metrics()
    counters = MemoryStore(clock=clock, metrics=metrics)
    for _ in range(3):
        assert attempt(LIMITS, counters, auth_user="alice", mail_from="a@x.example")[0] \
            is Result.PASS
    assert attempt(LIMITS, counters, auth_user="alice") == REFUSED
    assert attempt(LIMITS, counters, auth_user="ALICE") == REFUSED  # logins without case
    assert attempt(LIMITS, counters, auth_user="bob")[0] is Result.PASS
    assert metrics.registry.get_sample_value("mailward_ratelimit_hits_total", {
        "direction": "outbound", "kind": "user", "measure": "messages"}) == 2
    clock.now += 60
    assert attempt(LIMITS, counters, auth_user="alice")[0] is Result.PASS  # a new window


def test_recipients_are_counted_at_rcpt() -> None:
    counters = MemoryStore(clock=Clock())
    for i in range(5):
        assert attempt(LIMITS, counters, Stage.RCPT, auth_user="alice",
                       recipients=(f"r{i}@x.example",))[0] is Result.PASS
    assert attempt(LIMITS, counters, Stage.RCPT, auth_user="alice",
                   recipients=("r6@x.example",)) == REFUSED


def test_ipv6_clients_are_counted_by_prefix() -> None:
    counters = MemoryStore(clock=Clock())
    assert attempt(LIMITS, counters, client_ip="2001:db8:1:2::1")[0] is Result.PASS
    assert attempt(LIMITS, counters, client_ip="2001:db8:1:2:ffff::9")[0] is Result.PASS
    assert attempt(LIMITS, counters, client_ip="2001:db8:1:2::77") == REFUSED  # same /64
    assert attempt(LIMITS, counters, client_ip="2001:db8:1:3::1")[0] is Result.PASS
    assert attempt(LIMITS, counters, client_ip="203.0.113.1")[0] is Result.PASS
    narrow = LIMITS + "ipv6_prefix = 128\n"
    assert attempt(narrow, counters, client_ip="2001:db8:1:2::99")[0] is Result.PASS


def test_inbound_and_outbound_limits_are_separate() -> None:
    counters = MemoryStore(clock=Clock())
    for i in range(4):
        assert attempt(LIMITS, counters, Stage.RCPT, mail_from="x@spammer.example",
                       client_ip=f"198.51.100.{i}", recipients=("a@b.example",))[0] \
            is Result.PASS
    assert attempt(LIMITS, counters, Stage.RCPT, mail_from="x@spammer.example",
                   client_ip="198.51.100.99", recipients=("a@b.example",)) == REFUSED
    # the same domain from our own user is outbound, where no domain limit is set
    assert attempt(LIMITS, counters, Stage.RCPT, mail_from="x@spammer.example",
                   auth_user="carol", recipients=("a@b.example",))[0] is Result.PASS


def test_ten_thousand_recipient_flood_is_cut_off() -> None:
    counters = MemoryStore(clock=Clock())
    outcomes = [attempt(LIMITS, counters, Stage.RCPT, auth_user="mallory",
                        recipients=(f"r{i}@x.example",))[1] for i in range(10_000)]
    assert outcomes.count(Action.ACCEPT) == 5 and outcomes[5:] == [Action.TEMPFAIL] * 9995


@pytest.mark.parametrize(("text", "message"), [
    ("[check.ratelimit]\nlimits = outbound user messages many\n", "limits: expected lines"),
    ("[check.ratelimit]\nlimits = sideways user messages 3\n", "limits: expected lines"),
    ("[check.ratelimit]\nbackend = memcached\n", "backend: expected memory or redis"),
    ("[check.ratelimit]\nredis_url = http://x\n", "redis_url: expected a redis://"),
    ("[check.ratelimit]\nipv6_prefix = 200\n", "ipv6_prefix: expected an integer"),
])
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads(text)


# -- Redis -----------------------------------------------------------------------------------

WEEK = 7 * 86400  # Redis counts on the real clock: the longest window, so a test's few
# seconds fall in two windows (aligned to the epoch, which resets the count) only once a week


def test_redis_counts_are_shared_between_processes(redis_url: str) -> None:
    text = LIMITS.replace("window = 60", f"window = {WEEK}") + (
        f"backend = redis\nredis_url = {redis_url}\n")
    user = f"u{uuid.uuid4().hex[:8]}"
    a = RedisStore(redis_url, timeout=1)
    assert attempt(text, a, auth_user=user)[0] is Result.PASS
    # a second, separate process counts against the same limit
    code = ("import sys; sys.path.insert(0, 'milter'); "
            "from mailward.services.ratestore import RedisStore; "
            f"c = RedisStore({redis_url!r}, timeout=1); "
            f"print(c.add(['outbound:user:messages:{user}'], 1, {WEEK})[0])")
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "2"
    assert attempt(text, a, auth_user=user)[0] is Result.PASS  # third
    assert attempt(text, a, auth_user=user) == REFUSED  # fourth


def test_redis_keys_carry_no_clear_text(redis_url: str) -> None:
    user = f"secret-{uuid.uuid4().hex[:8]}@example.com"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # only this test's keys (others count in windows of a week)
    RedisStore(redis_url, timeout=1).add([f"outbound:user:messages:{user}"], 1, 60)
    keys = [k.decode() if isinstance(k, bytes) else k for k in client.keys("mailward:*")]
    assert keys and not any(user in k for k in keys)
    assert all(0 < client.ttl(k) <= 120 for k in keys)


@pytest.mark.parametrize(("choice", "action"), [("accept", Action.ACCEPT),
                                                 ("tempfail", Action.TEMPFAIL)])
def test_redis_down_fails_open_or_closed(choice: str, action: Action,
                                         caplog: pytest.LogCaptureFixture) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    metrics = Metrics()
    counters = RedisStore(dead, timeout=0.3, metrics=metrics)
    text = LIMITS + f"backend = redis\nredis_url = {dead}\non_backend_error = {choice}\n"
    result, got, _ = attempt(text, counters, auth_user="alice")
    assert (result, got) == (Result.TEMPERROR, action)
    assert metrics.registry.get_sample_value("mailward_ratelimit_backend_errors_total") == 1
    (line,) = [r.getMessage() for r in caplog.records if "temperror" in r.getMessage()]
    assert f"check ratelimit temperror at mail, {action}: redis: ConnectionError" in line
    assert ("fail closed" if choice == "tempfail" else "fail open") in line
