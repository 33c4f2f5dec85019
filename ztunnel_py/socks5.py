"""SOCKS5 outbound (RFC 1928 subset, SPEC §2): no authentication, CONNECT only, IPv4/IPv6/domain.

The negotiation is a small state machine over bytes; once the request is read, the connection is handed to
the outbound path with anything the client already sent after it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from hbone.tlslayer import Buffered

log = logging.getLogger("ztunnel.socks5")

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE_METHOD = 0xFF
CMD_CONNECT = 1
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

# Reply codes
SUCCEEDED = 0
GENERAL_FAILURE = 1
NOT_ALLOWED = 2
NETWORK_UNREACHABLE = 3
HOST_UNREACHABLE = 4
CONNECTION_REFUSED = 5
COMMAND_NOT_SUPPORTED = 7
ADDRESS_NOT_SUPPORTED = 8

MAX_GREETING = 2 + 255
MAX_REQUEST = 4 + 1 + 255 + 2


class Socks5Error(ValueError):
    def __init__(self, message: str, reply: int = GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Socks5Request:
    host: str  # an IP address in text form, or a domain name
    port: int
    is_domain: bool


def reply(code: int) -> bytes:
    """A reply with a zero bound address: what we bind upstream is none of the client's business."""
    return struct.pack("!BBBB4sH", VERSION, code, 0, ATYP_IPV4, b"\0\0\0\0", 0)


def parse_greeting(buf: bytes | bytearray) -> tuple[int, bool] | None:
    """(bytes used, no-auth offered) or None when more bytes are needed."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
    n = buf[1]
    if len(buf) < 2 + n:
        return None
    return 2 + n, NO_AUTH in buf[2 : 2 + n]


def parse_request(buf: bytes | bytearray) -> tuple[int, Socks5Request] | None:
    """(bytes used, request) or None when more bytes are needed."""
    if len(buf) < 5:
        return None
    ver, cmd, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
    if ver != VERSION:
        raise Socks5Error(f"bad request version {ver}")
    if cmd != CMD_CONNECT:
        raise Socks5Error(f"command {cmd} is not supported (only CONNECT)", COMMAND_NOT_SUPPORTED)
    if atyp == ATYP_IPV4:
        end = 4 + 4
        host_bytes = bytes(buf[4:end]) if len(buf) >= end else None
        host = str(ipaddress.IPv4Address(host_bytes)) if host_bytes is not None else ""
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        host_bytes = bytes(buf[4:end]) if len(buf) >= end else None
        host = str(ipaddress.IPv6Address(host_bytes)) if host_bytes is not None else ""
    elif atyp == ATYP_DOMAIN:
        end = 5 + buf[4]
        if len(buf) >= end:
            try:
                host = bytes(buf[5:end]).decode("ascii")
            except UnicodeDecodeError as exc:
                raise Socks5Error("domain name is not ASCII", ADDRESS_NOT_SUPPORTED) from exc
            if not host:
                raise Socks5Error("empty domain name", ADDRESS_NOT_SUPPORTED)
    else:
        raise Socks5Error(f"address type {atyp} is not supported", ADDRESS_NOT_SUPPORTED)
    if len(buf) < end + 2:
        return None
    (port,) = struct.unpack("!H", bytes(buf[end : end + 2]))
    return end + 2, Socks5Request(host, port, atyp == ATYP_DOMAIN)


RequestHandler = Callable[[asyncio.Transport, Buffered, Socks5Request], None]


class Socks5Protocol(Buffered):
    """Negotiates, then calls `on_request(transport, self, request)`; later bytes are kept for the relay.

    The negotiation must be over within `handshake_timeout` seconds: a client that connects and says nothing
    (or half a greeting) would otherwise hold a file descriptor for ever, and enough of them starve every
    other client of the process."""

    def __init__(self, on_request: RequestHandler, handshake_timeout: float) -> None:
        super().__init__()
        self._on_request = on_request
        self._handshake_timeout = handshake_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._stage = "greeting"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._handshake_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._stage == "done" or self.transport is None:
            return
        log.info("SOCKS5 from %s: no request within %.0fs, closing", _peer(self.transport), self._handshake_timeout)
        self._stage = "done"
        self.transport.close()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._stage == "done":
            super().data_received(data)
            return
        self._buf += data
        try:
            self._advance()
        except Socks5Error as exc:
            log.info("SOCKS5 from %s refused: %s", _peer(self.transport), exc)
            if self.transport is not None:
                if self._stage == "request":
                    self.transport.write(reply(exc.reply))
                self.transport.close()
            self._stage = "done"
            self._stop_deadline()

    def _advance(self) -> None:
        assert self.transport is not None
        if self._stage == "greeting":
            if len(self._buf) > MAX_GREETING and parse_greeting(self._buf) is None:
                raise Socks5Error("greeting too long")
            parsed = parse_greeting(self._buf)
            if parsed is None:
                return
            used, no_auth = parsed
            del self._buf[:used]
            if not no_auth:
                self.transport.write(bytes([VERSION, NO_ACCEPTABLE_METHOD]))
                raise Socks5Error("client offers no 'no authentication' method")
            self.transport.write(bytes([VERSION, NO_AUTH]))
            self._stage = "request"
        if self._stage == "request":
            parsed_request = parse_request(self._buf)
            if parsed_request is None:
                if len(self._buf) > MAX_REQUEST:
                    raise Socks5Error("request too long")
                return
            used, request = parsed_request
            rest = bytes(self._buf[used:])
            self._buf.clear()
            self._stage = "done"
            self._stop_deadline()  # the outbound path has its own connect timeout from here
            if rest:
                self.chunks.append(rest)
            self._on_request(self.transport, self, request)

    def eof_received(self) -> bool:
        if self._stage != "done":
            if self.transport is not None:
                self.transport.close()
            return False
        return super().eof_received()


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client that is gone"
