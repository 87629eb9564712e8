"""The bcc check: every Bcc/Resent-Bcc field is deleted."""

from __future__ import annotations

from mailward.core.verdict import (
    DeleteHeader,
    Result,
)
from tests.conftest import make_config, make_tx
from tests.conftest import run_check as run


def test_bcc_deletes_every_field_highest_index_first() -> None:
    tx = make_tx(headers=[("From", " a@b"), ("Bcc", " x@y"), ("To", " c@d"), ("BCC", " z@y"),
                          ("Resent-Bcc", " r@y"), ("bcc", " w@y")])
    r = run(make_config(), "bcc", tx)
    assert r.result is Result.PASS
    assert r.edits == (DeleteHeader("bcc", 3), DeleteHeader("BCC", 2), DeleteHeader("Bcc", 1),
                       DeleteHeader("Resent-Bcc", 1))


def test_bcc_none() -> None:
    r = run(make_config(), "bcc", make_tx(headers=[("From", " a@b"), ("X-Bcc-Note", " hi")]))
    assert (r.result, r.edits) == (Result.NONE, ())
