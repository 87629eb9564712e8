"""The structure of an Authenticated Received Chain (RFC 8617 §4.1, §5.2 steps 1 and 3): the
ARC sets of a message, read by instance, with the reason when they are no chain.

Shared by the `arc` check (validation) and `arc_seal` (which seals over the sets in instance
order), like core/dkimglue.py: no check logic. Every field is bounded before it is parsed:
at most 150 ARC fields and 256 KiB of them in all; an AMS or AS as a DKIM signature field
(core/dkimglue.py), an ARC-Authentication-Results to 16 KiB, its instance read by
core/authresults.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dkim.util import InvalidTagValueList, parse_tag_value

from mailward.core import authresults
from mailward.core.dkimglue import MAX_FIELD, shape_problem, text
from mailward.core.transaction import Header

MAX_INSTANCES = 50  # RFC 8617 §4.2.1
MAX_ARC_BYTES = 256 * 1024  # every ARC field of one message together
AAR, AMS, AS = "ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"
KINDS = {k.lower(): k for k in (AAR, AMS, AS)}


@dataclass
class ArcSet:
    """One instance: its three fields and the parsed tags of its AMS and AS."""

    instance: int
    fields: dict[str, Header] = field(default_factory=dict)
    tags: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    def sealer(self) -> str:
        return text(self.tags[AS].get(b"d", b"")).lower().rstrip(".")


class Broken(Exception):
    """The chain fails for the reason given (no exception of a library: ours, for the checks)."""


def _instance(kind: str, value: str) -> tuple[int, dict[bytes, bytes]]:
    """The i= of one ARC field, and the tags of an AMS or AS (RFC 8617 §4.1, §4.2.1)."""
    if kind == AAR:
        if len(value) > authresults.MAX_VALUE:
            raise Broken(f"{AAR} longer than {authresults.MAX_VALUE} characters")
        found = authresults.aar_instance(value)
        if found is None:
            raise Broken(f"{AAR} does not start with i=N; (RFC 8617 §4.1.1)")
        instance, tags = found, {}
    else:
        shape = shape_problem(value)
        if shape:
            raise Broken(f"{kind}: {shape}")
        try:
            tags = parse_tag_value(value.encode("utf-8", "surrogateescape"))
        except InvalidTagValueList as exc:
            raise Broken(f"{kind}: malformed tag list: {exc}") from None
        raw = tags.get(b"i", b"")
        if not (raw.isdigit() and len(raw) <= authresults.MAX_INSTANCE_DIGITS):
            raise Broken(f"{kind}: i= is not a number from 1 to {MAX_INSTANCES}")
        instance = int(raw)
    if not 1 <= instance <= MAX_INSTANCES:
        raise Broken(f"{kind}: i={instance} is not from 1 to {MAX_INSTANCES}")
    return instance, tags


def instance_of(value: str) -> int | None:
    """The i= of any ARC field value, when it reads as one (for a chain that is broken)."""
    found = authresults.aar_instance(value)
    if found is not None:
        return found
    try:
        raw = parse_tag_value(value[:MAX_FIELD].encode("utf-8", "surrogateescape")).get(b"i", b"")
    except InvalidTagValueList:
        return None
    return int(raw) if raw.isdigit() and len(raw) <= authresults.MAX_INSTANCE_DIGITS else None


def read_sets(headers: tuple[Header, ...]) -> list[ArcSet]:
    """The ARC sets, i=1 first, complete and numbered 1..N; Broken says why not (§5.2 step
    1 and 3.1-3.2). No ARC field: an empty list."""
    arc = [(KINDS[h.name.lower()], h) for h in headers if h.name.lower() in KINDS]
    if len(arc) > 3 * MAX_INSTANCES:
        raise Broken(f"{len(arc)} ARC fields: more than {MAX_INSTANCES} sets (RFC 8617 §4.2.1)")
    if sum(len(h.value) for _, h in arc) > MAX_ARC_BYTES:
        raise Broken(f"ARC fields longer than {MAX_ARC_BYTES // 1024} KiB together")
    sets: dict[int, ArcSet] = {}
    for kind, h in arc:
        instance, tags = _instance(kind, h.value)
        s = sets.setdefault(instance, ArcSet(instance))
        if kind in s.fields:
            raise Broken(f"two {kind} fields for i={instance}")
        s.fields[kind] = h
        if tags:
            s.tags[kind] = tags
    for i in range(1, max(sets, default=0) + 1):
        if i not in sets:
            raise Broken(f"no ARC set i={i} (instances must run from 1 without a gap)")
        missing = [k for k in (AAR, AMS, AS) if k not in sets[i].fields]
        if missing:
            raise Broken(f"ARC set i={i} has no {' and no '.join(missing)}")
    return [sets[i] for i in sorted(sets)]


def signed_names(tags: dict[bytes, bytes]) -> list[bytes]:
    return [n.strip().lower() for n in tags.get(b"h", b"").split(b":")]
