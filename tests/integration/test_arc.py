"""ARC through the real Postfix (issue 10): a p=reject author's post, changed and re-sent by a
mailing list that ARC-seals it, is refused unless the list is a trusted sealer, and refused
again when a later hop breaks the chain."""

from __future__ import annotations

import time

import dkim as dkimpy
import pytest

from tests.checks.test_dkim import publish, rsa_key
from tests.integration.conftest import Harness

pytestmark = pytest.mark.integration

TRUST = "[check.arc]\ntrusted_sealers = lists.example\n"


def list_post(harness: Harness, *, footer: str = "") -> tuple[str, bytes]:
    """alice@bank.example (p=reject) wrote to the list; the list tagged the subject, added a
    footer and sealed: its ARC-Authentication-Results say DMARC passed when alice's mail
    reached it. `footer`: what a later hop appends without sealing."""
    pem, public = rsa_key(2048)
    harness.dns.load_zone('_dmarc.bank.example. TXT "v=DMARC1; p=reject"\n'
                          'bank.example. TXT "v=spf1 -all"\n')
    publish(harness.dns, "arc1._domainkey.lists.example", f"v=DKIM1; k=rsa; p={public}")
    mid, data = harness.message(body="Hello list.\r\n", sender="alice@bank.example",
                                to="list@lists.example")
    data = data.replace(b"Subject: test", b"Subject: [list] test").replace(
        b"Hello list.\r\n", b"Hello list.\r\n-- \r\nlist footer\r\n")
    ar = (b"Authentication-Results: lists.example; arc=none; spf=pass "
          b"smtp.mailfrom=alice@bank.example; dmarc=pass header.from=bank.example\r\n")
    sealed = b"".join(dkimpy.arc_sign(ar + data, b"arc1", b"lists.example", pem,
                                      b"lists.example", timestamp=int(time.time()))) + data
    return mid, sealed + footer.encode()


def test_a_list_post_is_refused_unless_the_sealer_is_trusted(harness: Harness) -> None:
    mid, data = list_post(harness)
    out = harness.send(data, mail_from="list-bounces@lists.example")
    assert (out.stage, out.code, out.text) == (
        "data", 550, "5.7.1 Rejected by the DMARC policy of the sender domain bank.example "
                     "(p=reject)")
    assert harness.not_arrived(mid, wait=1)

    with harness.configured(TRUST):
        before = harness.metric("mailward_arc_overrides_total", sealer="lists.example")
        out = harness.send(data, mail_from="list-bounces@lists.example")
        assert (out.stage, out.code) == ("data", 250), out.text
        ar = dict(harness.arrived(mid).headers())["Authentication-Results"]
        assert "\tarc=pass (i=1) smtp.remote-ip=127.0.0.1 header.oldest-pass=0;\n" in ar, ar
        assert ('\tdmarc=fail reason="p=reject; accepted by ARC from lists.example" '
                "header.from=bank.example policy.dmarc=none") in ar, ar
        assert harness.metric("mailward_arc_overrides_total",
                              sealer="lists.example") == before + 1
        assert "dmarc: bank.example (p=reject) accepted by ARC from lists.example" in \
            harness.mw.log()
        assert " arc=pass dmarc=fail " in harness.mw.log()


def test_a_later_hop_that_breaks_the_chain_is_refused_again(harness: Harness) -> None:
    mid, data = list_post(harness, footer="-- \r\nadded by a forwarder\r\n")
    with harness.configured(TRUST):
        out = harness.send(data, mail_from="fwd@forwarder.example")
        assert (out.stage, out.code) == ("data", 550), out.text
        assert harness.not_arrived(mid, wait=1)
        assert "arc=fail dmarc=fail " in harness.mw.log()
