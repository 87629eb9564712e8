"""The lab: a private Postfix (postfix.py), a loopback DNS server (dns.py) and the demo.

For the demo, the tests and the benchmarks; nothing on the milter's runtime path imports it.
"""
