"""What a peer cannot make an HBONE connection hold: flow-control credit of streams that ended, answers it
never reads, an endless header block, and tunnels (with their application sockets) that ended cleanly.

Real TLS and sockets throughout; the misbehaving side is the hand-written `RawPeer` (tests/support/rawpeer.py),
which keeps its own account of every window, so a window that is never given back shows as a peer that
cannot send, and a queue that grows shows in the server's own objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, PingFrame, RstStreamFrame

from hbone.connection import MAX_QUEUED_CONTROL_FRAMES, H2Settings, HboneConnection
from hbone.errors import StreamReset
from hbone.tlslayer import READ_CHUNK
from hbone.tunnel import Tunnel
from tests.support.apps import TcpApp, TunnelServer
from tests.support.pki import TestPki, ident
from tests.support.rawpeer import HEADERS, WAIT, RawPeer, bounded, frame
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
KiB = 1024
MiB = 1024 * KiB

# The server answers a CONNECT to this authority with 200 and gives the stream a consumer that has paused
# reading: what arrives waits in the Tunnel, unacknowledged, as behind an application that does not read.
PAUSED = "127.0.0.78:7"


class Consumer(asyncio.Protocol):
    """A tunnel's protocol that records what reaches it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: list[BaseException | None] = []
        self.writing = True  # False between pause_writing and resume_writing

    def pause_writing(self) -> None:
        self.writing = False

    def resume_writing(self) -> None:
        self.writing = True

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


class PausingServer(TunnelServer):
    """The suite's HBONE test server, plus streams to `PAUSED` whose consumer does not read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused: list[tuple[Tunnel, Consumer]] = []

    async def _serve(self, tunnel: Tunnel) -> None:
        if tunnel.authority == PAUSED:
            consumer = Consumer()
            tunnel.set_protocol(consumer)
            tunnel.pause_reading()
            tunnel.respond(200)
            self.paused.append((tunnel, consumer))
            return
        await super()._serve(tunnel)

    def connection(self) -> HboneConnection:
        (conn,) = self.server.connections
        return conn


async def peer_for(pki: TestPki, server: TunnelServer, **kwargs: Any) -> RawPeer:
    return await RawPeer.connect(server.address, pki.client_ctx(CLIENT), **kwargs)


def rst(peer: RawPeer, sid: int, code: ErrorCodes) -> None:
    peer.write(RstStreamFrame(sid, error_code=code).serialize())


# -- 1. flow-control credit of streams that ended while their consumer did not read --------------------------
SMALL_WINDOWS = H2Settings(stream_window=256 * KiB, connection_window=1 * MiB)  # four streams fill the connection


async def fill_paused_stream(peer: RawPeer, srv: PausingServer, n: int) -> tuple[int, bytes]:
    """Open the `n`th stream to a consumer that does not read and send it a whole stream window (256 KiB)."""
    sid = await peer.connect_stream(PAUSED)
    body = os.urandom(256 * KiB)
    for offset in range(0, len(body), 32 * KiB):
        await peer.send_when_allowed(sid, body[offset : offset + 32 * KiB])
    await peer.ping()  # the server has it all
    tunnel, consumer = srv.paused[n]
    assert tunnel.bytes_received == len(body) and not consumer.data
    return sid, body


@pytest.mark.parametrize(
    "end",
    ["peer_cancel", "peer_no_error", "peer_connect_error", "server_reset", "server_close",
     "peer_end_stream_then_server_close"],
)  # fmt: skip
@bounded(90)
async def test_a_stream_cut_off_unread_gives_its_bytes_back_to_the_connection(pki, echo_app, end) -> None:
    """Twice as many streams as the connection window holds each fill their whole stream window while their
    consumer does not read, and then end in a way that means their bytes will never be read: reset by the
    peer before its END_STREAM (a cut-off stream, whatever the code), or reset or closed by us. What they
    held must go back to the connection's window, or the fifth stream could not send a byte and nor could any
    other on that connection; the consumer gets none of it, only connection_lost, without waiting for it to
    read (a reader that waits for its writer to drain would otherwise wait for ever)."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=SMALL_WINDOWS).start()
    peer = await peer_for(pki, srv)
    try:
        for n in range(8):
            sid, _ = await fill_paused_stream(peer, srv, n)
            tunnel, _ = srv.paused[n]
            if end.startswith("peer_end_stream"):
                peer.send_data(sid, b"", end_stream=True)
                await peer.ping()
            if end == "peer_cancel":
                rst(peer, sid, ErrorCodes.CANCEL)
            elif end == "peer_no_error":
                rst(peer, sid, ErrorCodes.NO_ERROR)
            elif end == "peer_connect_error":
                rst(peer, sid, ErrorCodes.CONNECT_ERROR)
            elif end == "server_reset":
                tunnel.reset()
            else:
                tunnel.close()
            await peer.ping()
            assert tunnel.finished, end
        assert not peer.goaways and not peer.violations, peer.summary()
        # The windows as the peer counts them and as h2 does agree, and nothing is owed any more.
        conn = srv.connection()
        window = conn._h2._inbound_flow_control_window_manager
        assert window.current_window_size == peer.send_conn_window
        assert window.current_window_size + conn.credit_owed == 1 * MiB
        for _, consumer in srv.paused:
            # Nothing more reaches the consumer but connection_lost, even while it is paused: an error for
            # CONNECT_ERROR, a clean end (SPEC §3.5) otherwise.
            await eventually(lambda consumer=consumer: consumer.lost, "connection_lost", WAIT)
            assert not consumer.data and not consumer.eof and len(consumer.lost) == 1
            if end == "peer_connect_error":
                assert isinstance(consumer.lost[0], StreamReset)
            else:
                assert consumer.lost == [None]
        # Not one byte was acknowledged twice.
        assert window.current_window_size + conn.credit_owed == 1 * MiB
        # And the connection still carries a tunnel.
        sid = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
        await peer.send_when_allowed(sid, b"still moving")
        await peer.until(lambda: bytes(peer.data[sid]) == b"still moving", "the echo")
    finally:
        await peer.close()
        await srv.close()


@pytest.mark.parametrize("reset", [None, ErrorCodes.CANCEL, ErrorCodes.NO_ERROR])
@bounded(90)
async def test_a_complete_stream_is_kept_for_its_consumer_within_the_connection_window(pki, reset) -> None:
    """Streams the peer ended with END_STREAM (then, or not, reset cleanly) are complete: their bytes are kept
    for the consumer, however long it takes to read, and stay counted against the connection's window until
    it does. So ending streams and opening new ones cannot make us hold more than one connection window of
    unread bytes: with four such streams the fifth gets no window, and once the consumers read, each gets
    its whole stream, its end, and the window back."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=SMALL_WINDOWS).start()
    peer = await peer_for(pki, srv)
    try:
        sent = []
        for n in range(4):
            sid, body = await fill_paused_stream(peer, srv, n)
            sent.append(body)
            peer.send_data(sid, b"", end_stream=True)
            if reset is not None:
                rst(peer, sid, reset)
            await peer.ping()
        assert not peer.goaways and not peer.violations, peer.summary()
        assert peer.send_conn_window == 0  # held by the unread bytes, finished streams or not
        fifth = await peer.connect_stream(PAUSED)
        await peer.ping()
        assert peer.room(fifth) == 0
        for (tunnel, consumer), body in zip(srv.paused[:4], sent, strict=True):
            assert not consumer.lost
            tunnel.resume_reading()
            assert bytes(consumer.data) == body and consumer.eof
            if reset is not None:  # (without one our side of the stream is still open)
                await eventually(lambda consumer=consumer: consumer.lost == [None], "connection_lost", WAIT)
        # The window is back (as the acknowledgements are batched, most of it): the fifth stream sends.
        await peer.send_when_allowed(fifth, b"x" * 32 * KiB)
        await peer.ping()
        assert srv.paused[4][0].bytes_received == 32 * KiB
        conn = srv.connection()
        window = conn._h2._inbound_flow_control_window_manager
        assert window.current_window_size == peer.send_conn_window
        # Every byte is in the window, owed, or still unread (the fifth stream's 32 KiB).
        assert window.current_window_size + conn.credit_owed == 1 * MiB - 32 * KiB
    finally:
        await peer.close()
        await srv.close()


@bounded(60)
async def test_a_connection_window_update_visits_only_streams_it_can_unblock(pki) -> None:
    """Fifty streams hold data for a peer that gives them no stream window (INITIAL_WINDOW_SIZE 0). A
    WINDOW_UPDATE for the connection cannot unblock any of them, so it must not walk them: a peer sending
    such frames (13 bytes each) would otherwise cost us a pass over every blocked stream per frame. A stream
    that gets window of its own still sends at once."""

    async def speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello" * 100)
        await writer.drain()
        await reader.read()

    app = await TcpApp(speaks_first).start()
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv, window=0)
    try:
        sids = [await peer.connect_stream(f"127.0.0.1:{app.port}") for _ in range(50)]
        conn = srv.server.connections.copy().pop()
        await eventually(lambda: len(conn._blocked) == 50, "every stream blocked on its window", WAIT)
        visits = 0
        flush_stream = conn._flush_stream

        def counting(tunnel: Tunnel) -> None:
            nonlocal visits
            visits += 1
            flush_stream(tunnel)

        conn._flush_stream = counting  # type: ignore[method-assign]
        for _ in range(100):
            peer.grant(0, 1)
        await peer.ping()
        assert visits == 0 and not any(peer.data[sid] for sid in sids)
        peer.grant(sids[7], 10)
        await peer.until(lambda: bytes(peer.data[sids[7]]) == b"hellohello", "ten bytes on that stream")
        assert not peer.violations, peer.summary()
    finally:
        await peer.close()
        await srv.close()
        await app.close()


@pytest.mark.parametrize("count", [32, 33])
@bounded(30)
async def test_a_settings_frame_of_more_than_32_parameters_ends_the_connection(pki, echo_app, count) -> None:
    """h2 applies each SETTINGS parameter in Python, so a frame of thousands (1 MiB holds 174,762) held the
    event loop, and everyone's traffic on it, for half a second. Up to 32 are taken (repeats allowed), as
    nghttp2 does; one more is GOAWAY ENHANCE_YOUR_CALM at the frame's header."""
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv)
    try:
        peer.write(frame(0x4, 0, 0, struct.pack("!HL", 0x3, 100) * count))  # MAX_CONCURRENT_STREAMS, repeated
        peer._pending_local.append({0x3: 100})  # for the peer's bookkeeping of our SETTINGS ACK
        if count == 32:
            await peer.ping()
            assert not peer.goaways, peer.summary()
            sid = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
            await peer.send_when_allowed(sid, b"fine")
            await peer.until(lambda: bytes(peer.data[sid]) == b"fine", "the echo")
        else:
            await peer.closed()
            assert [code for _, code in peer.goaways] == [ErrorCodes.ENHANCE_YOUR_CALM], peer.summary()
    finally:
        await peer.close()
        await srv.close()


@pytest.mark.parametrize("code", [ErrorCodes.CANCEL, ErrorCodes.CONNECT_ERROR])
@bounded(60)
async def test_a_reset_resumes_a_writer_paused_on_the_stream(pki, code) -> None:
    """A consumer that neither reads (its reading paused) nor can write (2 MiB to a peer granting no window:
    paused writing, as a StreamReader's writer waits in drain()) while the peer resets the stream: nothing
    will be sent any more, so it is told to resume writing. Otherwise a writer waiting to drain, which is
    what keeps it from reading, would wait forever, and with it whatever it holds (a waypoint request with
    its upstream exchange)."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv, window=0)
    try:
        sid = await peer.connect_stream(PAUSED)
        tunnel, consumer = srv.paused[0]
        tunnel.write(bytes(2 * MiB))
        assert not consumer.writing
        peer.send_data(sid, b"unread")
        rst(peer, sid, code)
        await eventually(lambda: consumer.writing, "resume_writing", WAIT)
        assert tunnel.finished and not consumer.data
    finally:
        await peer.close()
        await srv.close()


@bounded(60)
async def test_application_reset_while_the_relay_is_paused_ends_the_relay_and_frees_the_window(pki) -> None:
    """An application that stops reading holds its tunnel's relay paused with bytes queued in the Tunnel;
    when it then resets its socket, the relay resets the stream, ends, and the queued bytes go back to the
    connection's window (the pooled connection would otherwise lose that much for good)."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def not_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)
        await release.wait()

    app = await TcpApp(not_reading).start()
    app.server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv)
    try:
        sid = await peer.connect_stream(f"127.0.0.1:{app.port}")
        tunnel = srv.server.connections.copy().pop()._streams[sid]
        while not tunnel._reading_paused:  # until the app's socket backs up and the relay stops reading
            await peer.send_when_allowed(sid, os.urandom(64 * KiB))
            await peer.ping()
        await peer.send_when_allowed(sid, os.urandom(64 * KiB))  # this waits in the Tunnel
        await peer.ping()
        assert tunnel._recv
        writer = await asyncio.wait_for(accepted, WAIT)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the application resets its connection
        result = await asyncio.wait_for(srv.relays[-1].done, WAIT)
        assert isinstance(result.error, ConnectionError)
        await peer.until(lambda: sid in peer.resets, "the RST_STREAM")
        assert peer.resets[sid] == ErrorCodes.CONNECT_ERROR
        await peer.ping()
        conn = srv.server.connections.copy().pop()
        window = conn._h2._inbound_flow_control_window_manager
        assert window.current_window_size == peer.send_conn_window
        assert window.current_window_size + conn.credit_owed == 16 * MiB
    finally:
        release.set()
        await peer.close()
        await srv.close()
        await app.close()


# -- 2. answers the peer does not read ----------------------------------------------------------------------
@bounded(60)
async def test_ping_flood_from_a_peer_that_does_not_read_ends_the_connection(pki, echo_app) -> None:
    """A peer that sends PINGs and never reads the ACKs: once the server's writes are paused, it queues at
    most MAX_QUEUED_CONTROL_FRAMES more before it ends the connection (GOAWAY ENHANCE_YOUR_CALM) and, since
    that GOAWAY is not read either, cuts the socket. Other clients are served all along."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv, rcvbuf=4096)
    try:
        conn = srv.connection()
        peer.stop_reading()
        batch = PingFrame(0, opaque_data=b"flooding").serialize() * 1000
        with pytest.raises(ConnectionError):  # in the end the server cuts the socket (see below)
            for _ in range(2000):  # 2,000,000 PINGs at most, 34 MB
                peer.write(batch)
                await asyncio.wait_for(peer.writer.drain(), WAIT)
                if conn.is_closed:
                    continue  # and the flood goes on into a socket that no longer reads
                # What the server holds for this peer stays bounded: the write buffer's high-water mark
                # (64 KiB), the ACKs for one read (up to 256 KiB of PINGs) that took it past the mark, and
                # the ACKs it may queue after that; each ACK 17 bytes, in its own TLS record at worst (a
                # TLS 1.3 record adds 22 bytes).
                queued = conn._transport.get_write_buffer_size() if conn._transport else 0
                ack = 17 + 22
                bound = 64 * KiB + (READ_CHUNK // 17 + MAX_QUEUED_CONTROL_FRAMES) * ack
                assert queued < bound, f"{queued} bytes queued for the peer"
        assert conn.is_closed and "ENHANCE_YOUR_CALM" in conn.close_reason, conn.close_reason
        # The socket was cut, not left to drain into a peer that does not read: the flood ended in an error
        # (a close that waited for the peer to read would have blocked the peer's writes instead).
        client = await peer_for(pki, srv)
        sid = await client.connect_stream(f"127.0.0.1:{echo_app.port}")
        await client.send_when_allowed(sid, b"served")
        await client.until(lambda: bytes(client.data[sid]) == b"served", "the echo")
        await client.close()
    finally:
        await peer.close()
        await srv.close()


@bounded(30)
async def test_keepalive_ack_must_carry_the_payload_we_sent(pki) -> None:
    """A peer that does not read cannot keep the connection alive by sending PING ACKs it never saw the PING
    for: only an ACK with our random payload counts, so the keepalive timeout drops it."""
    settings = H2Settings(ping_interval=0.05, ping_timeout=0.3)
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER), settings=settings).start()
    peer = await peer_for(pki, srv)
    try:
        conn = srv.connection()
        peer.stop_reading()
        guesses = [b"hbone-ka", b"\x00" * 8, b"12345678"]
        for _ in range(1000):
            if conn.is_closed:
                break
            for guess in guesses:
                peer.write(PingFrame(0, flags=["ACK"], opaque_data=guess).serialize())
            await peer.writer.drain()
            await asyncio.sleep(0.02)
        assert conn.is_closed and "no PING answer" in conn.close_reason, conn.close_reason
        assert conn._ping_payload not in guesses
    finally:
        await peer.close()
        await srv.close()


# -- 3. a header block without end --------------------------------------------------------------------------
def continuation(sid: int, block: bytes, *, end: bool = False) -> bytes:
    return ContinuationFrame(sid, data=block, flags=["END_HEADERS"] if end else []).serialize()


@pytest.mark.parametrize("fragment", [16 * KiB, 1 * MiB], ids=["16KiB_frames", "1MiB_frames"])
@bounded(30)
async def test_header_block_over_the_header_list_limit_is_a_connection_error(pki, echo_app, fragment) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames without end: once the block passes the 64 KiB
    header list limit the connection ends with ENHANCE_YOUR_CALM (what h2 answers to an oversized header
    list), instead of buffering up to 64 frames of 1 MiB first."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv)
    try:
        first = await peer.connect_stream(f"127.0.0.1:{echo_app.port}")
        block = peer.encoder.encode([(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo_app.port}")])
        peer.write(frame(HEADERS, 0, first + 2, block))
        buffer = srv.connection()._h2.incoming_buffer
        for _ in range(63):
            if peer.eof:
                break
            peer.write(continuation(first + 2, b"\x00" * fragment))
            with contextlib.suppress(ConnectionError):  # the server may have closed already
                await peer.writer.drain()
            assert sum(len(part.data) for part in buffer._headers_buffer) <= 64 * KiB + fragment
        await peer.closed()
        assert peer.goaways == [(first, ErrorCodes.ENHANCE_YOUR_CALM)], peer.summary()
    finally:
        await peer.close()
        await srv.close()


@bounded(30)
async def test_header_block_split_into_continuations_within_the_limit_is_served(pki, echo_app) -> None:
    """The same shape within the limit is an ordinary request: a 40 KiB block in four frames is answered."""
    srv = await PausingServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv)
    try:
        authority = f"127.0.0.1:{echo_app.port}"
        block = peer.encoder.encode([(":method", "CONNECT"), (":authority", authority), ("x-big", "v" * 40_000)])
        quarter = len(block) // 4
        sid = 1
        peer.write(frame(HEADERS, 0, sid, block[:quarter]))
        peer.write(continuation(sid, block[quarter : 2 * quarter]))
        peer.write(continuation(sid, block[2 * quarter : 3 * quarter]))
        peer.write(continuation(sid, block[3 * quarter :], end=True))
        peer.send_windows[sid] = peer.peer_initial_window
        peer.recv_windows[sid] = peer.local_window
        await peer.until(lambda: sid in peer.headers, "the answer")
        assert peer.status(sid) == 200 and not peer.goaways
        await peer.send_when_allowed(sid, b"after a long header block")
        await peer.until(lambda: bytes(peer.data[sid]) == b"after a long header block", "the echo")
    finally:
        await peer.close()
        await srv.close()


# -- 4. a tunnel that ends cleanly ends its relay ----------------------------------------------------------
@pytest.mark.parametrize(
    "end",
    ["cancel_after_200", "no_error_after_200", "cancel_before_200", "end_stream_then_cancel", "end_stream_only"],
)
@bounded(30)
async def test_a_clean_stream_end_closes_the_application_side(pki, end) -> None:
    """RST_STREAM CANCEL or NO_ERROR (before or after the 200, or after END_STREAM) ends both directions: the
    application gets what was sent, then EOF, and its socket is closed even though the application never
    closes it, so the relay ends. END_STREAM alone is a half-close: the application can still answer."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    release = asyncio.Event()

    async def never_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())
        writer.write(b"answer after EOF")
        await release.wait()

    app = await TcpApp(never_closes).start()
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    peer = await peer_for(pki, srv)
    authority = f"127.0.0.1:{app.port}"
    try:
        if end == "cancel_before_200":
            sid = peer.open_stream(authority)
            rst(peer, sid, ErrorCodes.CANCEL)  # in the same read as the request
            sent = b""
        else:
            sid = await peer.connect_stream(authority)
            sent = b"request bytes"
            await peer.send_when_allowed(sid, sent)
            if end.startswith("end_stream"):
                peer.send_data(sid, b"", end_stream=True)
                assert await asyncio.wait_for(got, WAIT) == sent
            if end == "end_stream_only":
                await peer.until(lambda: bytes(peer.data[sid]) == b"answer after EOF", "the answer after EOF")
                assert not srv.relays[-1].done.done()
                return
            rst(peer, sid, ErrorCodes.NO_ERROR if end == "no_error_after_200" else ErrorCodes.CANCEL)
        await eventually(lambda: srv.relays, "the relay", WAIT)
        result = await asyncio.wait_for(srv.relays[-1].done, WAIT)
        assert result.error is None and result.a_to_b == len(sent)
        assert await asyncio.wait_for(got, WAIT) == sent
    finally:
        release.set()
        await peer.close()
        await srv.close()
        await app.close()
