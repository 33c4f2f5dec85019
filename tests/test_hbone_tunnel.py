"""Bytes through HBONE tunnels on loopback: bulk, half-close, pooling, and HBONE inside HBONE."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from hbone.client import client_over, dial, open_first_stream
from hbone.connection import H2Settings
from hbone.errors import ConnectRefused
from hbone.pool import Pool, PoolKey
from tests.support.apps import (
    TcpApp,
    TunnelServer,
    digest_reply,
    echo,
    pattern,
    read_all,
    send_pattern,
    stream_pair,
)
from tests.support.pki import TestPki, ident
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
MiB = 1 << 20


@pytest.fixture
async def server(pki: TestPki):
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER, "cluster2")).start()
    yield srv
    await srv.close()


async def connect(pki: TestPki, server: TunnelServer):
    return await dial(server.address, pki.client_ctx(CLIENT), [SERVER], local_identity=CLIENT)


async def test_bulk_256mib_each_way_at_once(pki: TestPki, server: TunnelServer) -> None:
    size = 256 * MiB

    async def both_ways(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        sending = asyncio.create_task(send_pattern(writer, seed=2, total=size))
        received = await read_all(reader)
        sent_digest = await sending
        writer.write_eof()
        return received, sent_digest

    app = await TcpApp(both_ways).start()
    conn = await connect(pki, server)
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)

    async def client_send() -> str:
        digest = await send_pattern(writer, seed=1, total=size)
        writer.write_eof()
        return digest

    client_sent, client_received = await asyncio.gather(client_send(), read_all(reader))
    await asyncio.sleep(0)
    (app_received, app_sent) = app.results[0]  # type: ignore[misc]
    assert app_received == (size, client_sent)
    assert client_received == (size, app_sent)
    conn.close()
    await app.close()


async def test_half_close_client_first(pki: TestPki, server: TunnelServer) -> None:
    """The client writes, shuts its write side, and still reads the whole reply."""
    app = await TcpApp(digest_reply).start()
    conn = await connect(pki, server)
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    body = pattern(7, 3 * MiB + 17)
    writer.write(body)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    assert reply.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    conn.close()
    await app.close()


async def test_half_close_server_first(pki: TestPki, server: TunnelServer) -> None:
    """The application sends and shuts its write side first, then still reads what the client sends."""
    greeting = pattern(8, 2 * MiB + 5)

    async def speak_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(greeting)
        writer.write_eof()
        await writer.drain()
        return await read_all(reader)

    app = await TcpApp(speak_then_listen).start()
    conn = await connect(pki, server)
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    assert await asyncio.wait_for(reader.read(), 10) == greeting  # EOF reached: the app half-closed
    late = pattern(9, MiB + 3)
    writer.write(late)
    writer.write_eof()
    await eventually(lambda: app.results, "the application to read to EOF")
    assert app.results == [(len(late), hashlib.sha256(late).hexdigest())]
    conn.close()
    await app.close()


async def test_500_concurrent_tunnels_through_one_pool(pki: TestPki, server: TunnelServer) -> None:
    arrived = 0
    all_open = asyncio.Event()

    async def echo_when_all_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        nonlocal arrived
        arrived += 1
        if arrived == 500:
            all_open.set()
        await all_open.wait()  # so that all 500 tunnels are open at the same time
        return await echo(reader, writer)

    app = await TcpApp(echo_when_all_open).start()
    pool = Pool()
    ctx = pki.client_ctx(CLIENT)
    key = PoolKey(CLIENT, frozenset([SERVER]), server.address, "127.0.0.1")
    dials = 0

    async def dialer():
        nonlocal dials
        dials += 1
        return await dial(server.address, ctx, [SERVER], local_identity=CLIENT)

    async def one(i: int) -> bool:
        tunnel = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        reader, writer = stream_pair(tunnel)
        body = pattern(i, 16 * 1024 + i)
        writer.write(body)
        writer.write_eof()
        got = await reader.read()
        return got == body

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), 60)
    assert all(results)
    assert server.streams_seen == 500
    # 100 streams at most per connection (the client's cap is below the server's 200).
    assert server.peak_streams_per_connection == 100
    assert dials == pool.connections_opened == 5
    await pool.close()
    await app.close()


async def test_pool_reuses_connection_and_dials_once(pki: TestPki, server: TunnelServer) -> None:
    app = await TcpApp(echo).start()
    pool = Pool()
    ctx = pki.client_ctx(CLIENT)
    key = PoolKey(CLIENT, frozenset([SERVER]), server.address, "127.0.0.1")
    dials = 0

    async def dialer():
        nonlocal dials
        dials += 1
        await asyncio.sleep(0.05)  # let every caller arrive while the dial is in flight
        return await dial(server.address, ctx, [SERVER], local_identity=CLIENT)

    tunnels = await asyncio.gather(*(pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", []) for _ in range(20)))
    assert dials == 1
    assert len({t.connection for t in tunnels}) == 1
    for t in tunnels:
        t.close()
    await pool.close()
    await app.close()


async def test_pool_opens_new_streams_elsewhere_while_unread_data_holds_a_connection(pki: TestPki) -> None:
    """A stream whose consumer does not read holds the connection's receive window with what it received (up to
    its stream window). On a pooled connection that is other clients' window: a waypoint's connection to an
    endpoint carries every client's requests, and a few clients that do not read their answers could stall
    everyone's. Once over a quarter of the window is held that way, new streams go to another connection;
    when the data is read, the first connection takes streams again."""
    settings = H2Settings(stream_window=1 << 20, connection_window=1 << 20)

    async def speaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(900 * 1024))
        await writer.drain()
        await reader.read()

    app = await TcpApp(speaks).start()
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    pool = Pool()
    key = PoolKey(CLIENT, frozenset([SERVER]), srv.address, "127.0.0.1")

    async def dialer():
        return await dial(srv.address, pki.client_ctx(CLIENT), [SERVER], local_identity=CLIENT, settings=settings)

    try:
        slow = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        slow.pause_reading()  # its consumer does not read: what arrives stays held
        first = slow.connection
        await eventually(lambda: slow.bytes_received == 900 * 1024, "the answer held, unread")
        other = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        assert other.connection is not first and pool.connections_opened == 2
        reader, _ = stream_pair(other)
        assert len(await asyncio.wait_for(reader.readexactly(900 * 1024), 10)) == 900 * 1024  # not stalled
        slow_reader, _ = stream_pair(slow)  # now read: the window comes back
        slow.resume_reading()
        await asyncio.wait_for(slow_reader.readexactly(900 * 1024), 10)
        await eventually(lambda: not first.congested, "the first connection's window back")
        third = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        assert third.connection is first
    finally:
        await pool.close()
        await srv.close()
        await app.close()


async def test_pool_releases_idle_connections(pki: TestPki, server: TunnelServer) -> None:
    app = await TcpApp(echo).start()
    pool = Pool(idle_timeout=0.2)
    ctx = pki.client_ctx(CLIENT)
    key = PoolKey(CLIENT, frozenset([SERVER]), server.address, "127.0.0.1")
    tunnel = await pool.open_stream(
        key, lambda: dial(server.address, ctx, [SERVER]), f"127.0.0.1:{app.port}", []
    )
    conn = tunnel.connection
    reader, writer = stream_pair(tunnel)
    writer.write_eof()
    await reader.read()
    await asyncio.wait_for(conn.closed, 5)
    assert pool.connections() == []
    await app.close()


async def test_refused_connect_status_reaches_client(pki: TestPki) -> None:
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER), deny=lambda t: True).start()
    conn = await dial(srv.address, pki.client_ctx(CLIENT), [SERVER])
    with pytest.raises(ConnectRefused) as info:
        await conn.open_stream("127.0.0.1:9")
    assert info.value.status == 401 and info.value.flag == "DENY"
    # The connection survives a refused stream.
    with pytest.raises(ConnectRefused):
        await conn.open_stream("127.0.0.1:9")
    conn.close()
    await srv.close()


@pytest.mark.parametrize("wait_for_settings", [True, False], ids=["after-settings", "connect-at-once"])
async def test_double_hbone_tls_and_http2_inside_a_connect_stream(pki: TestPki, wait_for_settings: bool) -> None:
    """An outer tunnel to a relay (a gateway stand-in) carries an inner mTLS + HTTP/2 CONNECT end to end;
    also when the inner CONNECT follows the preface at once, before the server's SETTINGS (as ztunnel's
    double HBONE sends it)."""
    gateway_id, inner_id = ident("gateway", "istio-system"), ident("inner-server")
    inner = await TunnelServer(inner_id, lambda: pki.server_ctx(inner_id, "cluster2")).start()
    outer = await TunnelServer(gateway_id, lambda: pki.server_ctx(gateway_id, "cluster2")).start()
    app = await TcpApp(digest_reply).start()

    outer_conn = await dial(outer.address, pki.client_ctx(CLIENT), [gateway_id])
    # The outer CONNECT reaches the inner server's 15008 stand-in, bytes relayed opaquely.
    outer_tunnel = await outer_conn.open_stream(f"{inner.address[0]}:{inner.address[1]}")
    inner_conn = await client_over(
        outer_tunnel, pki.client_ctx(CLIENT), [inner_id], name="inner", wait_for_settings=wait_for_settings
    )
    assert inner_conn.peer_identity == inner_id
    assert inner_conn.ready.done() is wait_for_settings
    inner_tunnel = await open_first_stream(inner_conn, f"127.0.0.1:{app.port}", [("x-forwarded-network", "network1")])
    assert inner_tunnel.header_values("baggage", response=True) == [b"k8s.cluster.name=test"]
    reader, writer = stream_pair(inner_tunnel)
    body = pattern(11, 5 * MiB + 1)
    writer.write(body)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 20)
    assert reply.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    inner_conn.close()
    outer_conn.close()
    for srv in (inner, outer):
        await srv.close()
    await app.close()
