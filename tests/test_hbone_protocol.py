"""HTTP/2 details of HBONE (SPEC §3.2, §3.5): settings, keepalive, resets in both directions, GOAWAY drain."""

from __future__ import annotations

import asyncio
import socket
import struct

import h2.config
import h2.events
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, HeadersFrame

from hbone.client import dial
from hbone.connection import H2Settings
from hbone.errors import StreamReset
from hbone.h2fast import make_connection
from tests.support.apps import TcpApp, TunnelServer, echo, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawh2 import RawH2Client
from tests.support.rawpeer import END_HEADERS, HEADERS, WAIT, RawServer, bounded, client_with_stream, frame

SERVER = ident("server")
CLIENT = ident("client")


@pytest.fixture
async def server(pki: TestPki):
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    yield srv
    await srv.close()


async def test_server_settings_are_istios(pki: TestPki, server: TunnelServer) -> None:
    client = await RawH2Client.open(server.address, pki.client_ctx(CLIENT))
    app = await TcpApp(echo).start()
    await client.request([(":method", "CONNECT"), (":authority", f"127.0.0.1:{app.port}")])
    remote = client.conn.remote_settings
    assert remote.initial_window_size == 4 * 1024 * 1024
    assert remote.max_frame_size == 1024 * 1024
    assert remote.max_concurrent_streams == 200
    assert remote.max_header_list_size == 64 * 1024
    # The connection window was opened to 16 MiB right after the preface.
    assert client.conn.outbound_flow_control_window == 16 * 1024 * 1024
    client.close()
    await app.close()


async def test_client_settings_and_stream_cap(pki: TestPki, server: TunnelServer) -> None:
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    local = conn._h2.local_settings
    assert local.enable_push == 0
    assert local.initial_window_size == 4 * 1024 * 1024
    assert conn.max_streams == 100  # min(our 100, the server's 200)
    conn.close()


async def test_unanswered_pings_drop_the_connection(pki: TestPki) -> None:
    """A peer that stops answering PINGs is dropped after the timeout; the streams on it end with an error."""
    settings = H2Settings(ping_interval=0.1, ping_timeout=0.3)
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    client = await RawH2Client.open(srv.address, pki.client_ctx(CLIENT))
    app = await TcpApp(echo).start()
    await client.request([(":method", "CONNECT"), (":authority", f"127.0.0.1:{app.port}")])
    # We never read again, so the server's PINGs go unanswered.
    await asyncio.sleep(1.0)
    data = await asyncio.wait_for(client.reader.read(), 5)  # everything up to the close
    assert client.reader.at_eof()
    events = client.conn.receive_data(data) if data else []
    assert any(isinstance(e, h2.events.PingReceived) for e in events)
    assert not srv.server.connections
    client.close()
    await srv.close()
    await app.close()


async def test_answered_pings_keep_the_connection(pki: TestPki) -> None:
    settings = H2Settings(ping_interval=0.1, ping_timeout=0.3)
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    conn = await dial(srv.address, pki.client_ctx(CLIENT), [SERVER], settings=settings)
    await asyncio.sleep(1.0)  # several PING rounds both ways
    assert not conn.is_closed and len(srv.server.connections) == 1
    conn.close()
    await srv.close()


async def test_application_rst_becomes_stream_reset_and_back(pki: TestPki, server: TunnelServer) -> None:
    """A TCP RST from the application reaches the client as RST_STREAM(CONNECT_ERROR), which our client
    turns into a TCP RST for its own side: the reset is never mistaken for a clean end."""

    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    app = await TcpApp(reset_after_hello).start()
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    writer.write(b"hello")
    with pytest.raises(StreamReset) as info:
        await asyncio.wait_for(reader.read(), 5)
    assert info.value.code == 0xA  # CONNECT_ERROR
    conn.close()
    await app.close()


async def test_client_reset_reaches_the_application_as_rst(pki: TestPki, server: TunnelServer) -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def read_until_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcome.set_result(await reader.read())
        except ConnectionError as exc:
            outcome.set_result(exc)

    app = await TcpApp(read_until_error).start()
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    tunnel.write(b"partial")
    await asyncio.sleep(0.1)
    tunnel.reset()  # as our relay does for a TCP RST from the client application
    got = await asyncio.wait_for(outcome, 5)
    assert isinstance(got, ConnectionResetError)
    conn.close()
    await app.close()


async def test_goaway_lets_open_streams_finish(pki: TestPki, server: TunnelServer) -> None:
    app = await TcpApp(echo).start()
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    drained = asyncio.create_task(server.server.shutdown(5.0))  # GOAWAY, then wait for streams
    await asyncio.sleep(0.2)
    assert not conn.usable  # no new streams after GOAWAY...
    writer.write(b"x" * 100_000)  # ...but the open one carries on, both ways
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"x" * 100_000
    await asyncio.wait_for(drained, 5)
    await asyncio.wait_for(conn.closed, 5)
    await app.close()


def test_header_blocks_are_sent_without_huffman_coding() -> None:
    """HPACK lets a string be sent as it is or Huffman-coded; ours are sent as they are (Huffman coding in
    pure Python was the largest single cost of opening a stream) and decode to the same headers."""
    conn = make_connection(h2.config.H2Configuration(client_side=True, header_encoding=None), lambda frame: None)
    conn.initiate_connection()
    conn.data_to_send()
    headers = [
        (b":method", b"CONNECT"),
        (b":authority", b"10.44.0.7:8080"),
        (b"baggage", b"k8s.namespace.name=default"),
    ]
    conn.send_headers(1, headers)
    raw = conn.data_to_send()
    frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
    frame.parse_body(memoryview(raw[9 : 9 + length]))
    assert isinstance(frame, HeadersFrame)
    assert b"10.44.0.7:8080" in frame.data and b"k8s.namespace.name=default" in frame.data  # literal, not coded
    assert hpack.Decoder().decode(frame.data, raw=True) == headers


@bounded(30)
async def test_client_resets_a_malformed_response_and_keeps_the_connection(pki: TestPki) -> None:
    """A malformed response (RFC 9113 §8.1.1) is an error of its stream: that CONNECT fails with the reason,
    and the tunnel already open on the connection, and the next CONNECT, go on."""
    srv = await RawServer(pki.server_ctx(SERVER), {}).start()
    conn, first, peer, a = await client_with_stream(srv, pki.client_ctx(CLIENT), SERVER)
    try:
        opening = asyncio.ensure_future(conn.open_stream("127.0.0.1:9"))
        await peer.until(lambda: len(peer.headers) == 2, "the second CONNECT")
        b = max(peer.headers)
        peer.write(frame(HEADERS, END_HEADERS, b, peer.encoder.encode([(":status", "200"), ("X-Upper", "1")])))
        with pytest.raises(StreamReset, match="malformed") as refused:
            await asyncio.wait_for(opening, WAIT)
        assert refused.value.code == ErrorCodes.PROTOCOL_ERROR
        await peer.until(lambda: b in peer.resets, "the client's RST_STREAM")
        assert peer.resets[b] == ErrorCodes.PROTOCOL_ERROR
        # The first tunnel carries bytes both ways.
        reader, writer = stream_pair(first)
        writer.write(b"up")
        await peer.until(lambda: bytes(peer.data[a]) == b"up", "bytes up the first tunnel")
        peer.send_data(a, b"down")
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"down"
        # And a new CONNECT on the same connection is answered.
        opening = asyncio.ensure_future(conn.open_stream("127.0.0.1:9"))
        await peer.until(lambda: len(peer.headers) == 3, "the third CONNECT")
        peer.respond(max(peer.headers))
        await asyncio.wait_for(opening, WAIT)
        assert not peer.goaways and not conn.is_closed, peer.summary()
    finally:
        conn.close()
        await srv.close()
