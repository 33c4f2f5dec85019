"""The SOCKS5 subset ztunnel speaks (RFC 1928: no auth, CONNECT, IPv4/IPv6/domain)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from tests.support.waiting import eventually
from ztunnel_py.socks5 import (
    COMMAND_NOT_SUPPORTED,
    Socks5Error,
    Socks5Protocol,
    Socks5Request,
    parse_greeting,
    parse_request,
    reply,
)


def test_greeting() -> None:
    assert parse_greeting(b"\x05") is None
    assert parse_greeting(b"\x05\x02\x00") is None  # two methods announced, one sent so far
    assert parse_greeting(b"\x05\x02\x02\x00") == (4, True)
    assert parse_greeting(b"\x05\x01\x02") == (3, False)
    with pytest.raises(Socks5Error, match="not SOCKS5"):
        parse_greeting(b"\x04\x01\x00")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50", Socks5Request("10.0.0.1", 80, False)),
        (b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x1f\x90", Socks5Request("::1", 8080, False)),
        (b"\x05\x01\x00\x03\x04echo\x23\x82", Socks5Request("echo", 9090, True)),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_requests(raw: bytes, expected: Socks5Request) -> None:
    assert parse_request(raw) == (len(raw), expected)
    for cut in range(len(raw)):  # any prefix just asks for more
        assert parse_request(raw[:cut]) is None


def test_bad_requests() -> None:
    with pytest.raises(Socks5Error) as info:
        parse_request(b"\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x50")  # BIND
    assert info.value.reply == COMMAND_NOT_SUPPORTED
    with pytest.raises(Socks5Error, match="address type"):
        parse_request(b"\x05\x01\x00\x09\x00\x00")
    with pytest.raises(Socks5Error, match="not ASCII"):
        parse_request(b"\x05\x01\x00\x03\x02\xc3\xa9\x00\x50")
    assert reply(0) == struct.pack("!BBBB4sH", 5, 0, 0, 1, bytes(4), 0)


async def serve(on_request, handshake_timeout: float = 10.0) -> tuple[asyncio.AbstractServer, int]:  # type: ignore
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Socks5Protocol(on_request, handshake_timeout), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_protocol_hands_over_the_request_and_early_bytes() -> None:
    got: asyncio.Future[tuple[Socks5Request, bytes]] = asyncio.get_running_loop().create_future()

    def on_request(transport, placeholder, request) -> None:  # type: ignore[no-untyped-def]
        transport.pause_reading()
        got.set_result((request, placeholder.take()))

    server, port = await serve(on_request)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    # The request and the first application bytes in one write, as curl may send them.
    writer.write(b"\x05\x01\x00\x03\x04echo\x00\x50" + b"GET / HTTP/1.1\r\n")
    request, early = await asyncio.wait_for(got, 5)
    assert request == Socks5Request("echo", 80, True)
    assert early == b"GET / HTTP/1.1\r\n"
    writer.close()
    server.close()


async def test_protocol_refuses_what_it_does_not_speak() -> None:
    server, port = await serve(lambda *a: pytest.fail("no request should get through"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x02")  # only username/password offered
    assert await reader.readexactly(2) == b"\x05\xff"
    assert await reader.read() == b""
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x35")  # UDP ASSOCIATE
    assert await reader.readexactly(2) == b"\x05\x00"
    assert (await reader.readexactly(10))[1] == COMMAND_NOT_SUPPORTED
    assert await reader.read() == b""
    writer.close()
    server.close()


async def test_negotiation_has_a_deadline() -> None:
    # Clients that connect and stall anywhere before a whole request would hold a descriptor each for ever.
    got: list[Socks5Request] = []
    server, port = await serve(lambda _t, _p, request: got.append(request), handshake_timeout=0.2)
    stalls = [b"", b"\x05", b"\x05\x01\x00", b"\x05\x01\x00\x05\x01\x00\x03\x04ech"]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in stalls]
    for (_, writer), sent in zip(clients, stalls, strict=True):
        writer.write(sent)
    for (reader, writer), sent in zip(clients, stalls, strict=True):
        answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        assert answer == (b"\x05\x00" if sent.startswith(b"\x05\x01\x00") else b""), sent
        writer.close()
    # A client that finishes in time is handed over.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00\x05\x01\x00\x03\x04echo\x00\x50")
    assert await reader.readexactly(2) == b"\x05\x00"
    await eventually(lambda: got, "the request is handed over")
    assert got == [Socks5Request("echo", 80, True)]
    writer.close()
    server.close()
