"""The DATA fast path (hbone/h2fast.py `DataPath`, `FastFrameBuffer.next_item`, `Outbox.add_data`) against h2's rules.

A plain DATA frame on an open stream skips h2's per-frame machinery and is accounted for on h2's own counters;
every other DATA frame goes through h2. These tests watch that from the outside, over real sockets and real
TLS: a hand-written HTTP/2 peer (`RawPeer`, tests/support/rawpeer.py) sends frames a well-behaved peer
never would, keeps its own account of every flow-control window and checks every frame that comes back. A
wrong count on either path shows up as an error where there must be none, no error where h2 raises one, a
stall, or a window that the peer and h2 no longer agree on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import struct
from typing import Any

import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, RstStreamFrame

from hbone.client import dial
from hbone.connection import H2Settings
from hbone.errors import ConnectionClosed
from hbone.tunnel import Tunnel
from tests.support.apps import TcpApp, TunnelServer, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawpeer import (
    DEFAULT_WINDOW,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    WAIT,
    RawPeer,
    RawServer,
    bounded,
    client_with_stream,
    frame,
)
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
KiB = 1024
MiB = 1024 * KiB

# The test server answers a CONNECT to this authority with 200 and then never reads the stream: nothing
# sent on it is acknowledged, so the peer's windows only shrink.
HOLD = "127.0.0.77:7"


class HoldingServer(TunnelServer):
    """The suite's HBONE test server, plus streams to `HOLD` that are answered and then never read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[Tunnel] = []

    async def _serve(self, tunnel: Tunnel) -> None:
        if tunnel.authority == HOLD:
            tunnel.respond(200)
            self.held.append(tunnel)
            return
        await super()._serve(tunnel)

    def h2(self) -> H2Connection:
        """h2's state for the one client connection the test has open."""
        (conn,) = self.server.connections
        return conn._h2


@pytest.fixture
async def server(pki: TestPki):
    srv = await HoldingServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    yield srv
    await srv.close()


@pytest.fixture
async def raw_peer(pki: TestPki):
    """Opens RawPeer clients; closes them after the test."""
    opened: list[RawPeer] = []

    async def open_peer(address: tuple[str, int], *, window: int = DEFAULT_WINDOW) -> RawPeer:
        peer = await RawPeer.connect(address, pki.client_ctx(CLIENT), window=window)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        await peer.close()


async def assert_still_serving(pki: TestPki, address: tuple[str, int], app: TcpApp) -> None:
    """Another client's CONNECT + echo round trip through the same server."""
    conn = await asyncio.wait_for(dial(address, pki.client_ctx(CLIENT), [SERVER]), WAIT)
    try:
        tunnel = await asyncio.wait_for(conn.open_stream(f"127.0.0.1:{app.port}"), WAIT)
        reader, writer = stream_pair(tunnel)
        body = os.urandom(300 * KiB)
        writer.write(body)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), WAIT) == body
    finally:
        conn.close()


async def fill(peer: RawPeer, sid: int, total: int, rng: random.Random) -> int:
    """Send exactly `total` flow-controlled bytes on `sid`, in plain and padded frames of random sizes, so
    that both paths count against the same windows. Returns the payload bytes (padding excluded)."""
    payload = 0
    left = total
    while left:
        if left >= 2 and rng.random() < 0.3:
            pad = rng.randint(0, min(255, left - 1))
            n = rng.randint(0, min(left - 1 - pad, 64 * KiB))
            left -= peer.send_data(sid, rng.randbytes(n), pad=pad)
        else:
            n = min(left, rng.randint(1, 100 * KiB))
            left -= peer.send_data(sid, rng.randbytes(n))
        payload += n
        await peer.writer.drain()
    return payload


def overrun(peer: RawPeer, sid: int, kind: str) -> None:
    """One frame that needs more window than there is (a single byte more, but for `large`)."""
    if kind == "plain":  # the fast path's case
        peer.send_data(sid, b"x")
    elif kind == "large":  # a frame the server may take in pieces (h2fast point 8), the first one over
        peer.send_data(sid, bytes(200 * KiB))
    elif kind == "padded":  # no data, but the Pad Length byte is flow-controlled
        peer.send_data(sid, b"", pad=0)
    else:
        peer.send_data(sid, b"x", end_stream=True)


def assert_connection_error(peer: RawPeer, code: ErrorCodes, last_stream_id: int) -> None:
    assert peer.goaways, f"no GOAWAY: {peer.summary()}"
    # h2 may send the same GOAWAY more than once; every one must name this error and stream.
    assert set(peer.goaways) == {(last_stream_id, code)}, peer.summary()


# -- 1. stream window ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "large", "padded", "end_stream"])
@bounded(60)
async def test_stream_window_overrun_is_flow_control_error(pki, server, echo_app, raw_peer, kind) -> None:
    """Exactly the stream window (4 MiB, never replenished) is accepted, counted by both paths together;
    one byte more is h2's FLOW_CONTROL_ERROR for the whole connection, and only that connection."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(HOLD)
    assert peer.send_windows[sid] == 4 * MiB and peer.send_conn_window == 16 * MiB
    payload = await fill(peer, sid, 4 * MiB, random.Random(1))
    await peer.ping()
    assert not peer.goaways and not peer.resets, peer.summary()
    assert peer.send_windows[sid] == 0  # no WINDOW_UPDATE: the stream was never read
    (held,) = server.held
    assert held.bytes_received == payload  # padding stripped, nothing lost
    assert server.h2().streams[sid]._inbound_window_manager.current_window_size == 0
    overrun(peer, sid, kind)
    await peer.closed()
    assert_connection_error(peer, ErrorCodes.FLOW_CONTROL_ERROR, sid)
    assert not server.server.connections or all(c.is_closed for c in server.server.connections)
    await assert_still_serving(pki, server.address, echo_app)


# -- 2. connection window -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "large", "padded", "end_stream"])
@bounded(60)
async def test_connection_window_overrun_is_flow_control_error(pki, echo_app, raw_peer, kind) -> None:
    """Stream windows of 256 KiB and a connection window of 384 KiB: one stream fills its own window, a
    second brings the connection window to exactly 0 while its own still has room; one byte more on the
    second stream is a connection-level FLOW_CONTROL_ERROR."""
    settings = H2Settings(stream_window=256 * KiB, connection_window=384 * KiB)
    srv = await HoldingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    try:
        peer = await raw_peer(srv.address)
        first = await peer.connect_stream(HOLD)
        second = await peer.connect_stream(HOLD)
        assert peer.send_conn_window == 384 * KiB and peer.send_windows[second] == 256 * KiB
        rng = random.Random(2)
        await fill(peer, first, 256 * KiB, rng)
        await fill(peer, second, 128 * KiB, rng)
        await peer.ping()
        assert not peer.goaways and not peer.resets, peer.summary()
        assert peer.send_conn_window == 0 and peer.send_windows[second] == 128 * KiB
        assert srv.h2()._inbound_flow_control_window_manager.current_window_size == 0
        overrun(peer, second, kind)
        await peer.closed()
        assert_connection_error(peer, ErrorCodes.FLOW_CONTROL_ERROR, second)
        await assert_still_serving(pki, srv.address, echo_app)
    finally:
        await srv.close()


@pytest.mark.parametrize("kind", ["plain", "large", "padded", "end_stream"])
@bounded(30)
async def test_flow_control_error_is_one_goaway_as_in_h2(pki, raw_peer, kind) -> None:
    """h2 answers a window overrun with one GOAWAY, whichever path counted the frame. (Two identical
    GOAWAYs are allowed by RFC 9113 §6.8, so this is a difference from h2, not a protocol violation.)"""
    settings = H2Settings(stream_window=64 * KiB, connection_window=1 * MiB)
    srv = await HoldingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    try:
        peer = await raw_peer(srv.address)
        sid = await peer.connect_stream(HOLD)
        await fill(peer, sid, 64 * KiB, random.Random(8))
        await peer.ping()
        overrun(peer, sid, kind)
        await peer.closed()
        assert peer.goaways == [(sid, ErrorCodes.FLOW_CONTROL_ERROR)], peer.summary()
    finally:
        await srv.close()


@bounded(30)
async def test_credit_goes_back_every_quarter_window(pki, server, raw_peer) -> None:
    """Credit for bytes the application took goes back once a quarter of a window is due, where h2 waits for
    half: on double HBONE the inner stream's window spans the buffers of three hops, and at half a window
    the source spent much of its time waiting for credit. A quarter of the 4 MiB stream window, read,
    brings that stream's window back whole; a quarter of the 16 MiB connection window, over two streams,
    brings the connection's back."""

    async def drains(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(256 * KiB):
            pass

    app = await TcpApp(drains).start()
    try:
        peer = await raw_peer(server.address)
        first = await peer.connect_stream(f"127.0.0.1:{app.port}")
        await fill(peer, first, 1 * MiB, random.Random(11))
        await peer.until(lambda: peer.send_windows[first] == 4 * MiB, "the stream's credit")
        assert peer.send_conn_window == 15 * MiB, peer.summary()
        second = await peer.connect_stream(f"127.0.0.1:{app.port}")
        await fill(peer, second, 3 * MiB, random.Random(12))
        await peer.until(lambda: peer.send_conn_window == 16 * MiB, "the connection's credit")
        assert 4 * MiB - peer.send_windows[second] < 1 * MiB  # less than a quarter still owed on the stream
        assert not peer.goaways and not peer.violations, peer.summary()
    finally:
        await app.close()


@bounded(30)
async def test_credit_owed_goes_back_when_held_data_fills_the_connection_window(pki, raw_peer) -> None:
    """Credit under a quarter window is not kept back while the connection's window runs out: a stream whose
    application read everything it got (100 KiB, credit owed) waits for the connection window, which a
    stream that is never read has just filled. Nothing more will be read there, so nothing more would be
    consumed to push the owed credit over a quarter: it must go back now, and so must what is read while the
    window stays low, or the reading stream waits for ever behind the one that does not read."""
    settings = H2Settings(stream_window=1 * MiB, connection_window=1 * MiB)
    srv = await HoldingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    taken = 0

    async def drains(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal taken
        while chunk := await reader.read(256 * KiB):
            taken += len(chunk)

    app = await TcpApp(drains).start()
    try:
        peer = await raw_peer(srv.address)
        reading = await peer.connect_stream(f"127.0.0.1:{app.port}")
        payload = await fill(peer, reading, 100 * KiB, random.Random(13))  # (padding counts for the windows)
        await eventually(lambda: taken == payload, "the application to read what was sent")
        await peer.ping()
        assert peer.send_conn_window == 1 * MiB - 100 * KiB  # under a quarter window: nothing given back yet
        held = await peer.connect_stream(HOLD)
        await fill(peer, held, 1 * MiB - 100 * KiB, random.Random(14))
        await peer.until(lambda: peer.send_conn_window >= 100 * KiB, "the owed connection credit")
        # And while the window stays low, what the reading stream takes goes back as it is read.
        more = await fill(peer, reading, peer.send_conn_window, random.Random(15))
        await eventually(lambda: taken == payload + more, "the application to read the rest")
        await peer.until(lambda: peer.send_conn_window > 0, "the credit for what was read with the window low")
        assert not peer.goaways and not peer.violations, peer.summary()
    finally:
        await app.close()
        await srv.close()


# -- 3. padding and END_STREAM (h2's path) -------------------------------------------------------------------
@pytest.mark.parametrize("last", ["data_end_stream", "empty_end_stream", "padded_end_stream"])
@bounded(60)
async def test_padded_and_end_stream_frames_arrive_exactly(server, echo_app, raw_peer, last) -> None:
    """Padded frames (h2's path) among plain ones (the fast path) reach the application byte-exact and in
    order, the END_STREAM reaches it as EOF, its EOF comes back as END_STREAM, and the padding is counted
    in, and given back to, the connection window exactly as the peer counts it."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    rng = random.Random(3)
    sent = bytearray()
    fixed: list[tuple[bytes, int | None]] = [
        (b"alpha", None),
        (b"bravo", 0),
        (b"", 7),
        (b"", None),
        (b"charlie" * 100, 255),
        (rng.randbytes(20000), None),
        (rng.randbytes(1000), 1),
    ]
    mixed = [(rng.randbytes(rng.randint(0, 3000)), rng.choice([None, None, 0, 1, 200, 255])) for _ in range(300)]
    for data, pad in fixed + mixed:
        await peer.send_when_allowed(sid, data, pad=pad)
        sent += data
    tail = rng.randbytes(777)
    if last == "data_end_stream":
        peer.send_data(sid, tail, end_stream=True)
        sent += tail
    elif last == "empty_end_stream":
        peer.send_data(sid, b"", end_stream=True)
    else:
        peer.send_data(sid, tail, end_stream=True, pad=33)
        sent += tail
    await peer.until(lambda: sid in peer.ended or sid in peer.resets, "the echo's END_STREAM")
    assert sid not in peer.resets and not peer.goaways and not peer.violations, peer.summary()
    assert bytes(peer.data[sid]) == bytes(sent)
    # The application saw EOF: it returns its byte count only then.
    await eventually(lambda: echo_app.results, "the echo application to see EOF")
    assert echo_app.results == [len(sent)]
    await peer.ping()
    h2conn = server.h2()
    assert h2conn._inbound_flow_control_window_manager.current_window_size == peer.send_conn_window
    assert h2conn.outbound_flow_control_window == peer.recv_conn_window
    # The connection carries on.
    again = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    peer.send_data(again, b"more", end_stream=True)
    await peer.until(lambda: again in peer.ended, "the second echo")
    assert bytes(peer.data[again]) == b"more"


# -- 4. DATA where there is no open stream -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("idle_above_highest", ("goaway", ErrorCodes.PROTOCOL_ERROR)),
        ("idle_even_id", ("goaway", ErrorCodes.PROTOCOL_ERROR)),
        ("stream_zero", ("goaway", ErrorCodes.PROTOCOL_ERROR)),
        ("skipped_below_highest", ("rst", ErrorCodes.STREAM_CLOSED)),
        ("after_client_reset", ("rst", ErrorCodes.STREAM_CLOSED)),
        ("after_end_stream", ("rst", ErrorCodes.STREAM_CLOSED)),
    ],
)
@bounded(60)
async def test_data_on_a_stream_that_is_not_open(pki, server, echo_app, raw_peer, case, expected) -> None:
    """A plain DATA frame (the shape the fast path takes) where no stream is open gets h2's answer: a
    connection error PROTOCOL_ERROR on an idle stream or stream 0 (RFC 9113 §5.1, §6.1), a stream error
    STREAM_CLOSED on a closed or half-closed (remote) stream, after which the connection carries on."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(HOLD)
    target = {"idle_above_highest": 101, "idle_even_id": 2, "stream_zero": 0}.get(case, sid)
    last_stream_id = sid
    if case == "skipped_below_highest":
        higher = await peer.connect_stream(HOLD, sid=sid + 4)  # the one in between is closed unopened
        target, last_stream_id = sid + 2, higher
    elif case == "after_client_reset":
        peer.write(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
    elif case == "after_end_stream":
        peer.send_data(sid, b"last", end_stream=True)
    await peer.ping()
    assert not peer.goaways and not peer.resets, peer.summary()
    peer.send_data(target, b"where does this go")
    kind, code = expected
    if kind == "goaway":
        await peer.closed()
        assert_connection_error(peer, code, last_stream_id)
        await assert_still_serving(pki, server.address, echo_app)
        return
    await peer.until(lambda: target in peer.resets, f"RST_STREAM on stream {target}")
    assert peer.resets == {target: code} and not peer.goaways, peer.summary()
    await peer.ping()
    assert server.h2()._inbound_flow_control_window_manager.current_window_size == peer.send_conn_window
    # Only that stream: the connection still tunnels.
    fresh = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    peer.send_data(fresh, b"fine", end_stream=True)
    await peer.until(lambda: fresh in peer.ended, "the echo on a fresh stream")
    assert bytes(peer.data[fresh]) == b"fine" and not peer.goaways


@pytest.mark.parametrize("separate_reads", [False, True], ids=["one_read", "separate_reads"])
@bounded(30)
async def test_data_inside_a_header_block_is_protocol_error(pki, server, echo_app, raw_peer, separate_reads) -> None:
    """A HEADERS frame without END_HEADERS must be followed by CONTINUATION (RFC 9113 §6.10); a plain DATA
    frame on another, open stream in between is a connection error, not data. In one read the DATA frame is
    parsed right after the HEADERS frame; in separate reads it meets the fast path's own check."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(HOLD)
    block = peer.encoder.encode([(":method", "CONNECT"), (":authority", HOLD)])
    peer.write(frame(HEADERS, 0, sid + 2, block))  # no END_HEADERS
    if separate_reads:
        await peer.writer.drain()
        buffer = server.h2().incoming_buffer
        await eventually(lambda: buffer._headers_buffer, "the server to hold the open header block")
    peer.send_data(sid, b"not now")
    await peer.closed()
    assert_connection_error(peer, ErrorCodes.PROTOCOL_ERROR, sid)
    assert server.held[0].bytes_received == 0
    await assert_still_serving(pki, server.address, echo_app)


@bounded(30)
async def test_data_frame_over_max_frame_size_is_frame_size_error(pki, server, echo_app, raw_peer) -> None:
    """The server announces MAX_FRAME_SIZE 1 MiB: a plain DATA frame of exactly 1 MiB is data, one byte
    more is FRAME_SIZE_ERROR (RFC 9113 §4.2) even though the stream window has room for it."""
    peer = await raw_peer(server.address)
    assert peer.peer_max_frame == 1 * MiB
    sid = await peer.connect_stream(HOLD)
    peer.send_data(sid, os.urandom(1 * MiB))
    await peer.ping()
    assert not peer.goaways and server.held[0].bytes_received == 1 * MiB
    peer.send_data(sid, os.urandom(1 * MiB + 1))
    await peer.closed()
    assert_connection_error(peer, ErrorCodes.FRAME_SIZE_ERROR, sid)
    await assert_still_serving(pki, server.address, echo_app)


@pytest.mark.parametrize("kind", [0x0, 0x1, 0x8])  # DATA, HEADERS, CONTINUATION
@bounded(30)
async def test_oversized_frame_is_refused_at_its_header(pki, server, echo_app, raw_peer, kind) -> None:
    """A frame header announcing 16 MiB (over our 1 MiB MAX_FRAME_SIZE) is FRAME_SIZE_ERROR as soon as its
    9 bytes are in: the server does not wait for (and keep) a body that may never come, so a peer cannot
    make it hold 16 MiB per connection that way."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(HOLD)
    length = (1 << 24) - 1
    peer.write(struct.pack("!HBBBL", length >> 8, length & 0xFF, kind, 0, sid) + bytes(1000))
    await peer.closed()
    assert_connection_error(peer, ErrorCodes.FRAME_SIZE_ERROR, sid)
    await assert_still_serving(pki, server.address, echo_app)


@bounded(30)
@pytest.mark.parametrize("case", ["more", "less"])
async def test_content_length_is_enforced_for_the_stream_only(pki, server, echo_app, raw_peer, case) -> None:
    """A stream that announced content-length is h2's to count (RFC 9113 §8.1.1): plain DATA up to the
    length is data; one byte beyond it, or END_STREAM short of it, makes the message malformed, an error of
    that stream only (RST_STREAM PROTOCOL_ERROR, where h2 would end the connection). The connection goes on,
    and its window with it: the refused bytes count as given back."""
    peer = await raw_peer(server.address)
    sid = await peer.connect_stream(HOLD, [("content-length", "10")])
    peer.send_data(sid, b"12345")
    if case == "more":
        peer.send_data(sid, b"67890")
    await peer.ping()
    assert not peer.goaways and not peer.resets, peer.summary()
    assert server.held[0].bytes_received == (10 if case == "more" else 5)
    if case == "more":
        peer.send_data(sid, b"!")
    else:
        peer.send_data(sid, b"6789", end_stream=True)
    await peer.until(lambda: sid in peer.resets, "the RST_STREAM")
    assert peer.resets[sid] == ErrorCodes.PROTOCOL_ERROR and not peer.goaways, peer.summary()
    echo = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    await peer.send_when_allowed(echo, b"still here")
    await peer.until(lambda: bytes(peer.data[echo]) == b"still here", "the echo on the same connection")
    (conn,) = server.server.connections
    window = conn._h2._inbound_flow_control_window_manager
    # Every byte is in the window or its credit is owed, the refused ones too.
    assert window.current_window_size + conn.credit_owed == 16 * MiB


# -- 4b. a large frame passed on as it arrives -----------------------------------------------------------------
async def write_slowly(peer: RawPeer, raw: bytes, rng: random.Random) -> None:
    """`raw` in slices of random sizes, each written on its own, so they reach the server in many reads."""
    while raw:
        n = rng.randint(1, 96 * KiB)
        peer.write(raw[:n])
        raw = raw[n:]
        await peer.writer.drain()
        await asyncio.sleep(0.001)


@bounded(60)
async def test_large_frame_is_passed_on_as_it_arrives(server, echo_app, raw_peer) -> None:
    """A plain DATA frame of 1 MiB whose first 200 KiB have arrived: the application has them (the echo
    starts) before the rest is sent. Then the rest in random slices, a frame that ends mid-slice followed by a PING,
    a padded frame and frames on a second stream: both echoes are byte-exact and h2's counters agree with
    the peer's to the byte."""
    peer = await raw_peer(server.address)
    first = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    second = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    rng = random.Random(11)
    sent: dict[int, bytearray] = {first: bytearray(), second: bytearray()}
    big = rng.randbytes(1 * MiB)
    raw = frame(0x0, 0, first, big)
    peer.send_conn_window -= len(big)
    peer.send_windows[first] -= len(big)
    # The peer writes no WINDOW_UPDATE of its own until its frames are all out (it would land inside one):
    # meanwhile the echo stops at the peer's 64 KiB connection window.
    peer.auto_window_update = False
    peer.write(raw[: 9 + 200 * KiB])
    await peer.until(lambda: len(peer.data[first]) >= 32 * KiB, "the start of the unfinished frame's echo")
    await write_slowly(peer, raw[9 + 200 * KiB :], rng)
    sent[first] += big
    # Then frames back to back, cut into slices anywhere: DATA frames of random sizes on both streams (some
    # padded, some larger than a slice), PINGs between them. Well within both windows.
    raw = b""
    for _ in range(24):
        sid = rng.choice((first, second))
        data = rng.randbytes(rng.randint(0, 150 * KiB))
        pad = rng.choice((None, None, 0, 200))
        payload = data if pad is None else bytes([pad]) + data + bytes(pad)
        raw += frame(0x0, 0 if pad is None else 0x8, sid, payload)
        peer.send_conn_window -= len(payload)
        peer.send_windows[sid] -= len(payload)
        sent[sid] += data
        if rng.random() < 0.3:
            raw += PingFrame(0, opaque_data=rng.randbytes(8)).serialize()
    await write_slowly(peer, raw, rng)
    peer.auto_window_update = True
    for sid in (0, first, second):  # (an increment of 0 would be a PROTOCOL_ERROR)
        if used := DEFAULT_WINDOW - (peer.recv_windows[sid] if sid else peer.recv_conn_window):
            peer.grant(sid, used)
    for sid in (first, second):
        await peer.until(lambda sid=sid: len(peer.data[sid]) >= len(sent[sid]), "the whole echo", timeout=30)
    await peer.ping()
    assert not peer.violations and not peer.goaways and not peer.resets, peer.summary()
    for sid in (first, second):
        assert bytes(peer.data[sid]) == bytes(sent[sid])
    h2conn = server.h2()
    assert h2conn._inbound_flow_control_window_manager.current_window_size == peer.send_conn_window
    for sid in (first, second):
        assert h2conn.streams[sid]._inbound_window_manager.current_window_size == peer.send_windows[sid]


# -- 5. window accounting over many frames ------------------------------------------------------------------
@bounded(120)
async def test_ten_thousand_small_frames_keep_the_windows_right(server, echo_app, raw_peer) -> None:
    """10,000 plain DATA frames of random sizes (about 20 MB, beyond both the 4 MiB stream and 16 MiB
    connection windows), sent only as far as the server's WINDOW_UPDATEs allow, echo back byte-exact; the
    echo never overruns the peer's small window; and at the end the server's h2 counters and the peer's
    agree to the byte, both ways."""
    peer = await raw_peer(server.address, window=256 * KiB)
    sid = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
    rng = random.Random(5)
    digest = hashlib.sha256()
    total = 0
    for i in range(10_000):
        data = b"" if i % 1000 == 999 else rng.randbytes(rng.randint(1, 4400))
        await peer.send_when_allowed(sid, data)
        digest.update(data)
        total += len(data)
    assert total > 20 * MiB
    await peer.until(lambda: len(peer.data[sid]) >= total, "the whole echo", timeout=60)
    await peer.ping()
    assert not peer.violations and not peer.goaways and not peer.resets, peer.summary()
    assert len(peer.data[sid]) == total and hashlib.sha256(peer.data[sid]).hexdigest() == digest.hexdigest()
    increments = sum(inc for s, inc in peer.window_updates if s == sid)
    assert increments >= total - 4 * MiB  # the stream window was given back, again and again
    h2conn = server.h2()
    stream = h2conn.streams[sid]
    assert h2conn._inbound_flow_control_window_manager.current_window_size == peer.send_conn_window
    assert stream._inbound_window_manager.current_window_size == peer.send_windows[sid]
    assert h2conn.outbound_flow_control_window == peer.recv_conn_window
    assert stream.outbound_flow_control_window == peer.recv_windows[sid]
    peer.send_data(sid, b"", end_stream=True)
    await peer.until(lambda: sid in peer.ended, "the echo's END_STREAM")
    assert len(peer.data[sid]) == total and not peer.violations


@pytest.mark.parametrize("binding", ["connection", "stream"])
@bounded(60)
async def test_server_sends_exactly_up_to_the_peer_windows(server, raw_peer, binding) -> None:
    """The server's send path (`DataPath.room`/`send`): with a backlog of 512 KiB from the application and
    a peer that gives no credit back, exactly the smaller of the two windows arrives (the connection's
    65,535 bytes, or a 10,000-byte stream window under a 1 MiB connection window), not a byte more; once
    credit flows again the rest arrives byte-exact."""
    blob = random.Random(9).randbytes(512 * KiB)

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(blob)
        await writer.drain()
        return len(await reader.read())

    app = await TcpApp(speak).start()
    try:
        window = 1 * MiB if binding == "connection" else 10_000
        peer = await raw_peer(server.address, window=window)
        peer.auto_window_update = False
        if binding == "stream":
            peer.grant(0, 1 * MiB)
        expected = DEFAULT_WINDOW if binding == "connection" else 10_000
        sid = await peer.connect_stream(f"127.0.0.1:{app.port}")
        await peer.until(lambda: len(peer.data[sid]) >= expected, f"the first {expected} bytes")
        await asyncio.sleep(0.3)  # the server has the rest; it must hold it back
        await peer.ping()
        assert not peer.violations and len(peer.data[sid]) == expected, peer.summary()
        assert min(peer.recv_conn_window, peer.recv_windows[sid]) == 0
        peer.auto_window_update = True
        peer.grant(0, expected)
        peer.grant(sid, expected)
        await peer.until(lambda: len(peer.data[sid]) >= len(blob), "the rest")
        peer.send_data(sid, b"", end_stream=True)
        await peer.until(lambda: sid in peer.ended, "the END_STREAM")
        assert not peer.violations and not peer.resets and not peer.goaways, peer.summary()
        assert bytes(peer.data[sid]) == blob
    finally:
        await app.close()


# -- the same fast path on the client side ------------------------------------------------------------------
@pytest.fixture
async def raw_server(pki: TestPki):
    servers: list[RawServer] = []

    async def start(local: dict[int, int]) -> RawServer:
        srv = await RawServer(pki.server_ctx(SERVER), local).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.close()


@bounded(60)
async def test_client_sends_within_a_small_window_that_shrinks(pki, raw_server) -> None:
    """The HBONE client's send path (`DataPath.send`, `Outbox.add_data`) against a peer with a 1000-byte
    stream window and 16 KiB frames, lowered to 100 bytes mid-transfer: every frame fits the windows as
    the peer counts them, the bytes arrive exact, the END_STREAM last."""
    srv = await raw_server({INITIAL_WINDOW_SIZE: 1000})
    conn, tunnel, peer, sid = await client_with_stream(srv, pki.client_ctx(CLIENT), SERVER)
    try:
        body = random.Random(6).randbytes(2 * MiB + 3)
        tunnel.write(body[:MiB])
        await peer.until(lambda: len(peer.data[sid]) >= 100 * KiB, "the first 100 KiB")
        peer.send_settings({INITIAL_WINDOW_SIZE: 100})  # the window may go negative for a moment (§6.9.2)
        tunnel.write(body[MiB:])
        tunnel.write_eof()
        await peer.until(lambda: sid in peer.ended, "the END_STREAM", timeout=60)
        assert not peer.violations and not peer.goaways and not peer.resets, peer.summary()
        assert bytes(peer.data[sid]) == body
        assert peer.data_frames > len(body) // 1000  # window-sized frames, not 16 KiB ones
    finally:
        conn.close()


@bounded(30)
async def test_client_stream_window_overrun_is_flow_control_error(pki, raw_server) -> None:
    """Our client's receive side: exactly its 4 MiB stream window is accepted while the tunnel is not read,
    one byte more is FLOW_CONTROL_ERROR, and the open tunnel learns that its connection is gone."""
    srv = await raw_server({})
    conn, tunnel, peer, sid = await client_with_stream(srv, pki.client_ctx(CLIENT), SERVER)
    try:
        assert peer.send_windows[sid] == 4 * MiB and peer.send_conn_window == 16 * MiB
        payload = await fill(peer, sid, 4 * MiB, random.Random(7))
        await peer.ping()
        assert not peer.goaways and tunnel.bytes_received == payload, peer.summary()
        peer.send_data(sid, b"x")
        await peer.until(lambda: peer.goaways, "the client's GOAWAY")
        assert_connection_error(peer, ErrorCodes.FLOW_CONTROL_ERROR, 0)
        await asyncio.wait_for(conn.closed, WAIT)
        assert tunnel.finished and tunnel.error is not None
    finally:
        conn.close()


@bounded(30)
async def test_client_rejects_data_before_the_response(pki, raw_server) -> None:
    """DATA on a stream whose response HEADERS have not come is h2's PROTOCOL_ERROR (RFC 9113 §8.1), not
    tunnel bytes: the fast path must not take it because the stream is open."""
    srv = await raw_server({})
    conn = await asyncio.wait_for(dial(srv.address, pki.client_ctx(CLIENT), [SERVER]), WAIT)
    try:
        peer = await asyncio.wait_for(srv.peer, WAIT)
        opening = asyncio.ensure_future(conn.open_stream("127.0.0.1:9"))
        await peer.until(lambda: peer.headers, "the CONNECT")
        (sid,) = peer.headers
        peer.send_data(sid, b"too early")
        await peer.until(lambda: peer.goaways, "the client's GOAWAY")
        assert_connection_error(peer, ErrorCodes.PROTOCOL_ERROR, 0)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(opening, WAIT)
    finally:
        conn.close()
