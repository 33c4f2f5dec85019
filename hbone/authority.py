"""CONNECT authorities: `ip:port`, `[v6]:port` or `host:port` (SPEC §3.3)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


class BadAuthority(ValueError):
    """Not `ip:port` or `host:port`."""


@dataclass(frozen=True, slots=True)
class Authority:
    host: str  # an IP address in canonical form, or a hostname
    port: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    def __str__(self) -> str:
        return format_authority(self.host, self.port)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(text: str | None) -> Authority:
    if not text:
        raise BadAuthority("missing :authority")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise BadAuthority(f"{text!r}: IPv6 authority must be [ip]:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise BadAuthority(f"{text!r} is not host:port")
        if ":" in host:  # where the address ends and the port begins is a guess without brackets
            raise BadAuthority(f"{text!r}: IPv6 authority must be [ip]:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadAuthority(f"{text!r} has no valid port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if text.startswith("[") or not _HOSTNAME.match(host):
            raise BadAuthority(f"{text!r}: {host!r} is neither an IP address nor a hostname") from None
        return Authority(host.rstrip(".").lower(), int(port_text), None)
    if text.startswith("[") and ip.version != 6:
        raise BadAuthority(f"{text!r}: brackets are for an IPv6 address only")
    return Authority(str(ip), int(port_text), ip)
