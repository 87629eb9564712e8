"""Adapters between an MTA and the core: `milter` speaks the milter protocol (pymilter)."""
