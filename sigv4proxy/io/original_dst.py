"""Recover the destination an iptables-redirected connection was originally sent to.

Owns: reading `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6) from an accepted socket and
turning the kernel's sockaddr bytes into `(host, port)`.

Must never: raise, block, log, or do any I/O beyond one or two getsockopt/getsockname calls. It is
called once per inbound connection in transparent mode; the caller decides what a missing original
destination means (usually: not redirected, treat as a plain reverse/forward proxy request).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

# From <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>; Python's socket module
# exposes neither.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

_SOCKADDR_IN_SIZE = 16  # family(2) port(2) addr(4) zero(8)
_SOCKADDR_IN6_SIZE = 28  # family(2) port(2) flowinfo(4) addr(16) scope_id(4)


def parse_sockaddr_in(raw: bytes) -> tuple[str, int] | None:
    """Decode a `struct sockaddr_in` (family in host order, port in network order)."""
    if len(raw) < 8:
        return None
    (family,) = struct.unpack_from("=H", raw, 0)
    if family != socket.AF_INET:
        return None
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int] | None:
    """Decode a `struct sockaddr_in6`; the scope id is dropped (redirects target global/loopback)."""
    if len(raw) < 24:
        return None
    (family,) = struct.unpack_from("=H", raw, 0)
    if family != socket.AF_INET6:
        return None
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _same_endpoint(a: tuple[str, int], b_host: str, b_port: int) -> bool:
    try:
        return a[1] == b_port and ipaddress.ip_address(a[0]) == ipaddress.ip_address(b_host)
    except ValueError:
        return False


def _mapped_ipv4(host: str) -> str | None:
    """'::ffff:1.2.3.4' -> '1.2.3.4' (an IPv4 peer on a dual-stack socket), else None."""
    try:
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return None
    return str(mapped) if mapped is not None else None


def original_destination(sock: socket.socket | Any) -> tuple[str, int] | None:
    """The (host, port) the client originally connected to, or None if not redirected.

    `sock` is an accepted TCP socket (or asyncio's TransportSocket wrapper). Returns None when the
    kernel has no NAT record for the connection, when the original destination equals the local
    address (no redirect happened), or on any socket error.
    """
    try:
        family = sock.family
        local = sock.getsockname()
        if family == socket.AF_INET:
            original = parse_sockaddr_in(sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE))
            local_host, local_port = local[0], local[1]
        elif family == socket.AF_INET6:
            local_v4 = _mapped_ipv4(local[0])
            if local_v4 is not None:
                # An IPv4 connection accepted on a dual-stack socket: conntrack holds an IPv4 entry.
                original = parse_sockaddr_in(sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE))
                local_host, local_port = local_v4, local[1]
            else:
                original = parse_sockaddr_in6(
                    sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_SIZE)
                )
                local_host, local_port = local[0].split("%", 1)[0], local[1]
        else:
            return None
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return None
    if original is None or _same_endpoint(original, local_host, local_port):
        return None
    return original
