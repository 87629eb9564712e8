"""RFC 5322 addresses: the Author Domain of a message (RFC 9989 §5.3.1), for DMARC and signing.

Comments and quoted strings are skipped and every `@domain` that remains counts, so
`"x" <a@evil.example> <b@good.example>` has two authors (Python's header parser keeps one).
A trailing dot is dropped and U-labels become A-labels (RFC 5890 §2.3).
"""

from __future__ import annotations

import re

from mailward.core.transaction import Transaction

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _strip_comments_and_quotes(value: str) -> str:
    out, depth, quoted, i = [], 0, False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and (quoted or depth):
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif c == '"' and not depth:
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
        i += 1
    return "".join(out)


def normalise_domain(domain: str) -> str | None:
    """A-label, lower case, no trailing dot; None if it is no domain name."""
    domain = domain.strip().rstrip(".")
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        return None
    return ascii_domain


def author_domains(tx: Transaction) -> tuple[list[str], str]:
    """Every domain in the From field(s), and a problem ('' when there is exactly one)."""
    fields = tx.get_all("From")
    if not fields:
        return [], "no From field"
    found = []
    for f in fields:
        text = _strip_comments_and_quotes(f.stripped)
        found += re.findall(r"@([^\s<>,;:@\"()]+)", text)
    domains = [normalise_domain(d) for d in found]
    if len(fields) > 1 or len(domains) > 1:
        return [d for d in domains if d], (f"{len(fields)} From fields" if len(fields) > 1
                                           else f"{len(domains)} author addresses")
    if not domains or domains[0] is None:
        return [], "no usable author domain in From"
    return [domains[0]], ""


def author_addresses(tx: Transaction) -> list[str]:
    """Every address in the From field(s), local part as written, domain normalised."""
    out = []
    for f in tx.get_all("From"):
        text = _strip_comments_and_quotes(f.stripped)
        for local, domain in re.findall(r"([^\s<>,;:@\"()]*)@([^\s<>,;:@\"()]+)", text):
            norm = normalise_domain(domain)
            out.append(f"{local}@{norm}" if norm else f"{local}@{domain}")
    return out
