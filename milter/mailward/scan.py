"""Run the chain offline on a message file: the same stages a live MTA would drive."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass

from mailward.core import pipeline
from mailward.core.outcomes import ArcOutcome, DmarcOutcome
from mailward.core.snapshot import Snapshot
from mailward.core.transaction import Body, Stage, Tls, Transaction, index_headers
from mailward.core.verdict import Action, AddHeader, ChangeHeader, DeleteHeader, Verdict
from mailward.services.dns import Budget

_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def parse_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a message into (name, value) pairs, as a milter sees them, and the body.

    Values keep their leading white space; folds become `\\n` plus the continuation, as
    Postfix hands them over. A line that is no header ends the header (as in Postfix).
    """
    raw = raw.replace(b"\r\n", b"\n")
    headers: list[tuple[bytes, list[bytes]]] = []  # name, value lines (joined once: linear)
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        line = raw[pos:] if end < 0 else raw[pos:end]
        nxt = len(raw) if end < 0 else end + 1
        if line == b"":
            pos = nxt
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1].append(line)
        else:
            name, colon, value = line.partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name.rstrip()):
                break
            headers.append((name.rstrip(), [value]))
        pos = nxt
    pairs = [(n.decode("ascii", "surrogateescape"),
              b"\n".join(v).decode("utf-8", "surrogateescape")) for n, v in headers]
    return pairs, raw[pos:]


@dataclass(frozen=True, slots=True)
class ScanReport:
    """What each stage decided: refusals before DATA, and the final verdict."""

    mail: Verdict
    rcpts: tuple[tuple[str, Verdict], ...]
    final: Verdict | None
    direction: str


def scan(snapshot: Snapshot, raw: bytes, *, client_ip: str = "", helo: str = "",
         mail_from: str = "", rcpts: tuple[str, ...] = (), tls_version: str = "",
         auth_user: str = "", daemon_name: str = "") -> ScanReport:
    """Drive MAIL, each RCPT and end of message for `raw`, as the adapter would."""
    config = snapshot.config
    budget = Budget(config.dns.budget)
    pairs, body_bytes = parse_message(raw)
    base = Transaction(
        stage=Stage.CONNECT,
        client_ip=ipaddress.ip_address(client_ip) if client_ip else None,
        helo=helo, tls=Tls(tls_version) if tls_version else None, auth_user=auth_user,
        daemon_name=daemon_name, mail_from=mail_from)
    tx, mail = pipeline.evaluate(Stage.MAIL, base, snapshot, budget=budget)
    if mail.action is not Action.ACCEPT:
        return ScanReport(mail, (), None, str(tx.direction))
    verdicts = []
    accepted: tuple[str, ...] = ()
    for rcpt in rcpts:
        candidate = dataclasses.replace(tx, recipients=(*accepted, rcpt))
        _, verdict = pipeline.evaluate(Stage.RCPT, candidate, snapshot, budget=budget)
        verdicts.append((rcpt, verdict))
        if verdict.action is Action.ACCEPT:
            accepted += (rcpt,)
    if not accepted:
        return ScanReport(mail, tuple(verdicts), None, str(tx.direction))
    body = Body(threshold=config.milter.spool_threshold, directory=config.milter.spool_dir)
    try:
        body.write(body_bytes.replace(b"\n", b"\r\n"))  # as an MTA hands it over: CRLF
        eom = dataclasses.replace(tx, recipients=accepted, headers=index_headers(pairs),
                                  body=body)
        eom, final = pipeline.evaluate(Stage.EOM, eom, snapshot, budget=budget)
    finally:
        body.close()
    return ScanReport(mail, tuple(verdicts), final, str(eom.direction))


def arc_dict(v: Verdict) -> dict[str, object] | None:
    """The ARC chain as the `arc` check found it, and any DMARC override it allowed."""
    arc = next((r.outcome for r in v.results if isinstance(r.outcome, ArcOutcome)), None)
    if arc is None:
        return None
    override = next((r.outcome.arc_override for r in v.results
                     if isinstance(r.outcome, DmarcOutcome) and r.outcome.arc_override), "")
    return {"result": str(arc.result), "reason": arc.reason, "instances": arc.instances,
            "oldest_pass": arc.oldest_pass, "sealers": list(arc.sealers),
            "trusted": [f"{t.sealer} (i={t.instance})" for t in arc.vouches],
            "dmarc_override": override or None}


def report_dict(report: ScanReport) -> dict[str, object]:
    """A JSON-ready view of a report."""

    def verdict(v: Verdict) -> dict[str, object]:
        edits: list[dict[str, object]] = []
        for e in v.edits:
            if isinstance(e, DeleteHeader):
                edits.append({"op": "delete", "name": e.name, "index": e.index})
            elif isinstance(e, ChangeHeader):
                edits.append({"op": "change", "name": e.name, "index": e.index, "value": e.value})
            elif isinstance(e, AddHeader):
                edits.append({"op": "insert" if e.top else "add", "name": e.name,
                              "value": e.value})
        return {
            "action": str(v.action),
            "reply": str(v.reply) if v.reply else None,
            "decided_by": v.decided_by or None,
            "quarantine_reason": v.quarantine_reason or None,
            "quarantine": str(v.quarantine) if v.action is Action.QUARANTINE else None,
            "results": [{"check": r.check, "result": str(r.result), "action": str(r.action),
                         "reason": r.reason, "would": str(r.would) if r.would else None}
                        for r in v.results],
            "header_edits": edits,
            "arc": arc_dict(v),
        }

    return {
        "direction": report.direction,
        "mail": verdict(report.mail),
        "rcpts": {rcpt: verdict(v) for rcpt, v in report.rcpts},
        "final": verdict(report.final) if report.final else None,
    }
