"""The destination a connection had before iptables redirected it to us (SO_ORIGINAL_DST)."""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the IPv6 twin (IP6T_SO_ORIGINAL_DST) has the same number


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The pre-NAT destination, or None when the connection was not redirected."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            ip = ipaddress.IPv6Address(raw[8:24])
            host = str(ip.ipv4_mapped or ip)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            host = socket.inet_ntoa(raw[4:8])
    except OSError:
        return None
    local = sock.getsockname()
    if (host, port) == (local[0], local[1]):
        return None
    return host, port
