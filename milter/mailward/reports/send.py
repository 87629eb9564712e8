"""Sending built reports as mail (RFC 9990 §2.5.1): a text part and the gzipped XML under the
RFC's file name, the Subject the RFC prescribes, DKIM-signed with `[check.dkim_sign]`'s key for
the sender's domain so that the report mail passes DMARC, handed to `[reports] relay`
(STARTTLS as `relay_tls` says, AUTH when `relay_user` is set).

Nothing here is DMARC-specific but the subject: a TLS-RPT reporter would hand `deliver` its own
message the same way.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate

import dkim

from mailward.core.settings import RelayTls, ReportsSettings
from mailward.errors import MailwardError
from mailward.reports.build import Built
from mailward.services import dkimcrypto
from mailward.services.keys import SigningKey

dkimcrypto.install()  # dkimpy's RSA through OpenSSL, as for the milter's own signing

SIGNED = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
          b"content-type"]


class SendError(MailwardError):
    """The relay refused or could not be reached; the message says which."""


def message(built: Built, *, sender: str, to: str, key: SigningKey | None) -> bytes:
    r = built.report
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = (f"Report Domain: {r.policy_domain} Submitter: {r.org_name} "
                      f"Report-ID: <{r.report_id}>")
    msg["Date"] = formatdate(time.time(), usegmt=True)
    msg["Message-ID"] = f"<{r.report_id}.{int(time.time())}>"
    msg.set_content(f"DMARC aggregate report for {r.policy_domain} from {r.org_name}, "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.begin))} to "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.end))} UTC: "
                    f"{r.messages} message(s) from {len(r.rows)} source(s).\n")
    msg.add_attachment(built.gz, maintype="application", subtype="gzip",
                       filename=built.filename)
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    if key is None:
        return raw
    signature = dkim.sign(raw, key.selector.encode(), key.domain.encode(), key.material,
                          include_headers=SIGNED, signature_algorithm=key.algorithm,
                          canonicalize=(b"relaxed", b"relaxed"))
    return bytes(signature) + raw


def _context(mode: RelayTls) -> ssl.SSLContext:
    """`require`: the relay's certificate must be valid for its name (the system's CAs);
    `may`: encrypted when offered, certificate unchecked, as opportunistic SMTP TLS is (a
    local relay often has a self-signed one)."""
    context = ssl.create_default_context()
    if mode is RelayTls.MAY:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def deliver(settings: ReportsSettings, sender: str, to: str, raw: bytes) -> str:
    """Hand one message to the relay; the relay's reply, or SendError."""
    host, port = settings.relay
    try:
        with smtplib.SMTP(host, port, timeout=60) as smtp:
            smtp.ehlo()
            if settings.relay_tls is not RelayTls.NO:
                if smtp.has_extn("starttls"):
                    smtp.starttls(context=_context(settings.relay_tls))
                    smtp.ehlo()
                elif settings.relay_tls is RelayTls.REQUIRE:
                    raise SendError(f"relay {host}:{port} offers no STARTTLS (relay_tls = "
                                    "require)")
            if settings.relay_user:
                with open(settings.relay_password_file, encoding="utf-8") as fh:
                    password = fh.read().strip()
                smtp.login(settings.relay_user, password)
            refused = smtp.sendmail(sender, [to], raw)
            if refused:
                raise SendError(f"relay refused {to}: {refused[to]}")
            return f"accepted by {host}:{port}"
    except smtplib.SMTPResponseException as exc:
        said = exc.smtp_error
        text = said.decode("utf-8", "replace") if isinstance(said, bytes) else str(said)
        raise SendError(f"relay {host}:{port}: {exc.smtp_code} {text}") from None
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise SendError(f"relay {host}:{port}: {type(exc).__name__}: {exc}") from None
