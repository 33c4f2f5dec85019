"""HBONE over IPv6 on the loopback ::1: a client that knows only an IPv4 source address still reaches an IPv6
peer. (That an IPv6 wildcard listener takes IPv6 only cannot be shown on loopback: Linux makes a socket bound
to a specific IPv6 address IPv6-only anyway.)"""

from __future__ import annotations

import socket

import pytest

from hbone.client import dial
from tests.support.apps import TcpApp, TunnelServer, echo, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawpeer import bounded


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")

SERVER, CLIENT = ident("server"), ident("client")


@bounded(20)
async def test_an_ipv4_source_address_does_not_stop_a_connection_to_ipv6(pki: TestPki) -> None:
    # A dual-stack workload's first address may be IPv4 while the pod it reaches is IPv6: the source address
    # is bound only when it is of the destination's family.
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start("::1", 0)
    app = await TcpApp(echo).start("::1", 0)
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER], source_ip="127.0.0.1")
    try:
        tunnel = await conn.open_stream(f"[::1]:{app.port}")
        reader, writer = stream_pair(tunnel)
        writer.write(b"over IPv6")
        writer.write_eof()
        assert await reader.read() == b"over IPv6"
    finally:
        conn.close()
        await server.close()
        await app.close()
