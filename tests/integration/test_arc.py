"""ARC through the real Postfix (issue 10): a p=reject author's post, changed and re-sent by a
mailing list that ARC-seals it, is refused unless the list is a trusted sealer, and refused
again when a later hop breaks the chain; mail our list server re-submits leaves sealed, and
the seal verifies with dkimpy and with our own arc check at the next hop."""

from __future__ import annotations

import time
from pathlib import Path

import dkim as dkimpy
import pytest

from mailward.services import keys
from mailward.services.dns import Budget, DnsSettings, Resolver
from mailward.services.reportstore import SqliteStore
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
    start = int(time.time())
    mid, data = list_post(harness)
    out = harness.send(data, mail_from="list-bounces@lists.example")
    assert (out.stage, out.code, out.text) == (
        "data", 550, "5.7.1 Rejected by the DMARC policy of the sender domain bank.example "
                     "(p=reject)")
    assert harness.not_arrived(mid, wait=1)
    assert "dmarc_override" not in harness.mw.log()

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
        assert " dmarc_override=arc:lists.example verdict=accept " in harness.mw.log()
    # the report store has both as applied: the refusal, and the override as RFC 9990's
    # trusted_forwarder (the writer thread writes a moment later)
    store = SqliteStore(str(harness.mw.workdir / "reports.sqlite"))
    deadline = time.monotonic() + 30  # a deadline for waiting only
    while len(rows := store.messages(start, 2**40, policy_domain="bank.example")) < 2:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert [(r.disposition, r.dkim_aligned, r.spf_aligned, r.reasons) for r in rows] == [
        ("reject", "fail", "fail", ()),
        ("none", "fail", "fail", (("trusted_forwarder", "ARC sealed by lists.example"),))]
    assert {r.envelope_from for r in rows} == {"lists.example"}
    store.close()


def test_a_later_hop_that_breaks_the_chain_is_refused_again(harness: Harness) -> None:
    mid, data = list_post(harness, footer="-- \r\nadded by a forwarder\r\n")
    with harness.configured(TRUST):
        out = harness.send(data, mail_from="fwd@forwarder.example")
        assert (out.stage, out.code) == ("data", 550), out.text
        assert harness.not_arrived(mid, wait=1)
        assert "arc=fail dmarc=fail " in harness.mw.log()


def test_our_seal_verifies_with_dkimpy_and_at_the_next_hop(harness: Harness,
                                                          tmp_path: Path) -> None:
    """A post sealed upstream arrives (our A-R: arc=pass), our list server tags and footers
    it and re-submits it on the ORIGINATING service: it leaves with our set i=2 over our
    inbound results, which dkimpy verifies, and which our own arc check passes at the next
    hop (oldest-pass 2: the list changed what the first sealer signed)."""
    key = keys.generate(domain="lab.test", selector="arc1", directory=str(tmp_path))
    harness.dns.load_zone(keys.zone_line(key))
    pem, public = rsa_key(2048)
    publish(harness.dns, "arc1._domainkey.lists.example", f"v=DKIM1; k=rsa; p={public}")
    mid, data = harness.message(body="Hello list.\r\n")  # alice@example.org: DMARC passes
    ar = b"Authentication-Results: lists.example; arc=none; dmarc=pass header.from=example.org\r\n"
    upstream = b"".join(dkimpy.arc_sign(ar + data, b"arc1", b"lists.example", pem,
                                        b"lists.example")) + data
    assert harness.send(upstream).code == 250
    delivered = harness.arrived(mid)
    assert "\tarc=pass (i=1) smtp.remote-ip=127.0.0.1 header.oldest-pass=0;\n" in \
        dict(delivered.headers())["Authentication-Results"]

    relayed = delivered.data.replace(b"Subject: test", b"Subject: [list] test").replace(
        b"Hello list.\r\n", b"Hello list.\r\n-- \r\nlist footer\r\n")
    with harness.configured(f"[check.arc_seal]\nkey = lab.test arc1 {key.path}\n"
                            "daemons = ORIGINATING\n"):
        assert harness.send(relayed, submission=True).code == 250
        sealed = harness.sink.wait_for(lambda m: mid.encode() in m.data
                                       and b"d=lab.test" in m.data, 30)
    headers = sealed.headers()
    assert [n for n, _ in headers[:4]] == ["ARC-Seal", "ARC-Message-Signature",
                                            "ARC-Authentication-Results",
                                            "Authentication-Results"]
    aar = headers[2][1]
    assert aar.startswith(" i=2; mx.lab.test;\n\t"), aar
    assert "\tarc=pass (i=1) smtp.remote-ip=127.0.0.1 header.oldest-pass=0;\n" in aar, aar
    assert "\tdmarc=pass header.from=example.org policy.dmarc=reject" in aar, aar
    assert "cv=pass" in headers[0][1]
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", harness.dns.port),)))
    cv, _, why = dkimpy.arc_verify(sealed.data, dnsfunc=lambda n, timeout=5: resolver.bind(
        Budget(30)).dkim_txt(n))
    assert cv == dkimpy.CV_Pass, why

    assert harness.send(sealed.data).code == 250  # the next hop: ourselves, inbound
    again = harness.sink.wait_for(lambda m: mid.encode() in m.data
                                  and m.data.count(b"ARC-Seal:") == 2
                                  and b"oldest-pass=2" in m.data, 30)
    assert "\tarc=pass (i=2) smtp.remote-ip=127.0.0.1 header.oldest-pass=2;\n" in \
        dict(again.headers())["Authentication-Results"]
