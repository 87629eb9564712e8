"""The trace check: internal hops removed or rewritten on outbound mail."""

from __future__ import annotations

from mailward.core.verdict import (
    ChangeHeader,
    DeleteHeader,
    Result,
)
from tests.conftest import make_config, make_tx
from tests.conftest import run_check as run

RECEIVED = [
    ("Received", " from laptop.corp.example (laptop.corp.example [10.1.2.3])\n\tby relay"),
    ("Received", " from ext.example.org (ext.example.org [198.51.100.1]) by mx"),
    ("Received", " from host (unknown [IPv6:fd00::5]) by relay; Mon, 1 Jan 2024 10:30:00"),
    ("Received", " from app.internal.example by relay"),
    ("X-Originating-IP", " [10.1.2.3]"),
    ("X-Mailer", " Foo 1.0"),
]
TRACE_CFG = "[check.trace]\ninternal_hosts = internal.example\n"


def test_trace_removes_internal_hops_on_outbound() -> None:
    r = run(make_config(TRACE_CFG), "trace", make_tx(headers=RECEIVED, auth_user="alice"))
    assert r.result is Result.PASS
    assert set(r.edits) == {DeleteHeader("Received", 1), DeleteHeader("Received", 3),
                            DeleteHeader("Received", 4), DeleteHeader("X-Originating-IP", 1)}


def test_trace_rewrite_keeps_the_rest() -> None:
    cfg = make_config(TRACE_CFG + "action = rewrite\nstrip_headers = X-Originating-IP X-Mailer\n")
    r = run(cfg, "trace", make_tx(headers=RECEIVED, client_ip="10.9.9.9"))
    changes = {e.index: e.value for e in r.edits if isinstance(e, ChangeHeader)}
    assert changes[1] == (" from laptop.corp.example (laptop.corp.example [redacted])\n\tby "
                          "relay")
    assert changes[3] == " from host (unknown [redacted]) by relay; Mon, 1 Jan 2024 10:30:00"
    assert changes[4] == " from redacted.invalid by relay"
    assert DeleteHeader("X-Mailer", 1) in r.edits
    assert 2 not in changes


def test_trace_leaves_inbound_alone() -> None:
    r = run(make_config(TRACE_CFG), "trace", make_tx(headers=RECEIVED))
    assert (r.result, r.edits) == (Result.NONE, ())
