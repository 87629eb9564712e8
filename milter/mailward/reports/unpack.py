"""Getting a report's XML out of a message or a file, with every size bounded. Pure.

Reports come as text/xml, gzip (RFC 9990) or zip (what many RFC 7489 reporters still send),
attached to a message or as a file fetched elsewhere. Decompression never produces more than
`limit` bytes: a member that would is refused as a bomb, whatever its header claims; a zip may
hold a handful of members, of which the first `.xml` one is read.
"""

from __future__ import annotations

import email
import email.policy
import io
import zipfile
import zlib
from email.message import Message

from mailward.reports.aggregate import ReportError

MAX_PARTS = 50
MAX_ZIP_MEMBERS = 8
_REPORT_TYPES = ("application/gzip", "application/x-gzip", "application/zip",
                 "application/x-zip-compressed", "application/x-zip", "text/xml",
                 "application/xml", "application/octet-stream")


class Bomb(ReportError):
    """Decompression would pass the limit."""


def gunzip(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ReportError(f"not valid gzip: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Bomb(f"gzip expands past {limit} bytes")
    if not inflater.eof:
        raise ReportError("gzip data truncated")
    return out


def unzip(data: bytes, limit: int) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                raise ReportError(f"zip with {len(members)} members")
            xml = [m for m in members if m.filename.lower().endswith(".xml")]
            if not xml:
                raise ReportError("zip without an .xml member")
            if xml[0].compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # zipfile inflates bzip2 and LZMA members a whole chunk at a time, past any
                # read limit: a few hundred bytes can become gigabytes
                raise ReportError(f"zip member compressed with method {xml[0].compress_type} "
                                  "(only stored or deflated are read)")
            if xml[0].file_size > limit:
                raise Bomb(f"zip member of {xml[0].file_size} bytes, past {limit}")
            with archive.open(xml[0]) as member:
                out = member.read(limit + 1)  # the header may lie: read no further
    except ReportError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            zlib.error, RuntimeError, ValueError, OSError) as exc:
        raise ReportError(f"not a valid zip: {type(exc).__name__}") from None
    if len(out) > limit:
        raise Bomb(f"zip member expands past {limit} bytes")
    return out


def xml_of(data: bytes, limit: int) -> bytes:
    """A report file's XML, by its first bytes (gzip, zip or XML itself)."""
    if data.startswith(b"\x1f\x8b"):
        return gunzip(data, limit)
    if data.startswith(b"PK\x03\x04"):
        return unzip(data, limit)
    head = data.lstrip()[:5]
    if head.startswith((b"<?xml", b"<feed", b"<")):
        if len(data) > limit:
            raise Bomb(f"XML of {len(data)} bytes, past {limit}")
        return data
    raise ReportError("neither XML, gzip nor zip")


def attachments(raw: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(filename, XML) of each report attached to a message."""
    try:
        return _attachments(raw, limit)
    except ReportError:
        raise
    except (RecursionError, LookupError, ValueError, TypeError, AttributeError) as exc:
        # the email package on hostile MIME (thousands of nested parts, say)
        raise ReportError(f"unreadable message: {type(exc).__name__}") from None


def _attachments(raw: bytes, limit: int) -> list[tuple[str, bytes]]:
    message: Message = email.message_from_bytes(raw, policy=email.policy.compat32)
    found: list[tuple[str, bytes]] = []
    total = 0
    for number, part in enumerate(message.walk()):
        if number >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = str(part.get_filename() or "")
        if ctype not in _REPORT_TYPES and not name.lower().endswith((".xml", ".gz", ".zip")):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        xml = xml_of(payload, limit - total)
        total += len(xml)  # all attachments together stay within the limit
        found.append((name[:200], xml))
    if not found:
        raise ReportError("no report attached")
    return found
