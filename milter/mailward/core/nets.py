"""Small helpers for addresses and networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mailward.core.ini import IPNetwork
from mailward.core.transaction import IPAddress

# Addresses that never identify a host on the public Internet: RFC 1918, RFC 6598 (CGNAT),
# loopback, link-local, RFC 4193 unique-local and IPv6 link-local.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
              "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10")
)


def in_networks(address: IPAddress | None, networks: Iterable[IPNetwork]) -> bool:
    """True when `address` lies in one of `networks` (IPv4-mapped IPv6 counts as IPv4)."""
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address.version == n.version and address in n for n in networks)


def parse_ip(text: str) -> IPAddress | None:
    """An address from text such as `10.1.2.3` or `IPv6:2001:db8::1`; None if it is not one."""
    text = text.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
