"""MTA-STS for Postfix's SMTP client (RFC 8461): `mailward sts run`, `query`, `purge`."""
