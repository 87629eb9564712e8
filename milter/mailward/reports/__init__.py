"""DMARC aggregate reports (RFC 9990): record, build, send, ingest, show."""
