"""What the HBONE server answers (SPEC §3.4), and bad input that must cost only its own stream or connection."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame

from hbone.client import dial
from hbone.connection import (
    CANCELLED_STREAMS_BURST,
    CANCELLED_STREAMS_PER_SECOND,
    REJECTED_STREAMS_BURST,
    REJECTED_STREAMS_PER_SECOND,
    H2Settings,
    HboneConnection,
    ResetBudget,
)
from hbone.server import ThrottledLog
from tests.support.apps import TcpApp, TunnelServer, read_all, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawh2 import RawH2Client
from tests.support.rawpeer import END_HEADERS, END_STREAM, HEADERS, RawPeer, bounded, frame
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
DENIED_HOST = "127.0.0.66"


@pytest.fixture
async def server(pki: TestPki):
    srv = await TunnelServer(
        SERVER, lambda: pki.server_ctx(SERVER), deny=lambda t: t.target is not None and t.target.host == DENIED_HOST
    ).start()
    yield srv
    await srv.close()


async def raw(pki: TestPki, server: TunnelServer) -> RawH2Client:
    return await RawH2Client.open(server.address, pki.client_ctx(CLIENT))


async def assert_still_serving(pki: TestPki, server: TunnelServer, app: TcpApp) -> None:
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    writer.write(b"still here")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"still here"
    conn.close()


async def others_go_on(
    pki: TestPki,
    server: TunnelServer,
    app: TcpApp,
    flooded: HboneConnection,
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    other: HboneConnection,
) -> None:
    """After a flooding connection was cut: the server drops it, a tunnel on another connection opened before
    the flood still carries data, and new connections are served."""
    await eventually(lambda: flooded not in server.server.connections, "the server to drop the flooded connection")
    reader, writer = stream
    writer.write(b"the other connection goes on")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"the other connection goes on"
    other.close()
    await assert_still_serving(pki, server, app)


def closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "127.0.0.1:80")], 400),
        ([(":method", "CONNECT"), (":authority", "no-port-here")], 400),
        ([(":method", "CONNECT"), (":authority", "127.0.0.1:99999")], 400),
        ([(":method", "CONNECT"), (":authority", "::1:80")], 400),
        ([(":method", "CONNECT"), (":authority", f"{DENIED_HOST}:8080")], 401),
        ([(":method", "CONNECT"), (":authority", f"127.0.0.1:{closed_port()}")], 503),
    ],
    ids=["GET", "no-port", "port-out-of-range", "unbracketed-ipv6", "denied", "nothing-listening"],
)
async def test_error_status_ends_the_stream_with_headers_only(pki, server, echo_app, headers, status) -> None:
    client = await raw(pki, server)
    outcome = await client.request(headers)
    assert outcome.status == status
    assert outcome.ended_with_headers  # END_STREAM on the HEADERS frame
    assert outcome.data == b""  # no body
    assert not outcome.connection_closed
    # The same connection still carries a good CONNECT.
    ok = await client.request([(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo_app.port}")])
    assert ok.status == 200 and not ok.ended_with_headers
    client.close()


async def test_success_is_200_without_end_stream_and_with_response_headers(pki, server, echo_app) -> None:
    client = await raw(pki, server)
    outcome = await client.request([(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo_app.port}")])
    assert outcome.status == 200 and not outcome.ended_with_headers and outcome.reset_code is None
    assert (b"baggage", b"k8s.cluster.name=test") in outcome.headers
    client.close()


async def exchange(peer: RawPeer, sid: int, payload: bytes) -> None:
    """`payload` goes up the tunnel `sid` to the echo application and comes back whole."""
    before = len(peer.data[sid])
    await peer.send_when_allowed(sid, payload)
    await peer.until(lambda: len(peer.data[sid]) >= before + len(payload), f"the echo on stream {sid}")
    assert bytes(peer.data[sid][before:]) == payload


def send_request(peer: RawPeer, headers: list[tuple[str, str]], *, end_stream: bool = False) -> int:
    sid = peer.next_stream_id
    peer.next_stream_id += 2
    flags = END_HEADERS | (END_STREAM if end_stream else 0)
    peer.write(frame(HEADERS, flags, sid, peer.encoder.encode(headers)))
    return sid


# Malformed requests (RFC 9113 §8.1.1): errors of their stream, not of the connection.
MALFORMED = {
    "GET without :path": ([(":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1:80")], True),
    "CONNECT with :scheme and :path": (
        [(":method", "CONNECT"), (":scheme", "https"), (":path", "/"), (":authority", "127.0.0.1:80")],
        False,
    ),
    "CONNECT without :authority": ([(":method", "CONNECT")], False),
    "uppercase header name": ([(":method", "CONNECT"), (":authority", "127.0.0.1:80"), ("X-Upper", "1")], False),
    "connection-specific header": (
        [(":method", "CONNECT"), (":authority", "127.0.0.1:80"), ("connection", "keep-alive")],
        False,
    ),
}


@bounded(60)
async def test_malformed_requests_reset_their_stream_and_the_connection_goes_on(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="hbone.connection")
    echo = f"127.0.0.1:{echo_app.port}"
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    first = await peer.connect_stream(echo)
    await exchange(peer, first, b"before")
    for n, (name, (headers, end_stream)) in enumerate(MALFORMED.items()):
        sid = send_request(peer, headers, end_stream=end_stream)
        if not end_stream:
            peer.send_data(sid, b"sent before the reset arrived")  # for a stream the server has reset
        await peer.until(lambda sid=sid: sid in peer.resets, f"RST_STREAM for the {name}")
        await peer.ping()  # the server has read everything sent so far
        assert sid not in peer.headers, name  # no answer, only the reset
        assert peer.resets[sid] in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.STREAM_CLOSED), name
        assert not peer.goaways and not peer.eof, (name, peer.summary())
        await exchange(peer, first, f"after {name}".encode())
        await exchange(peer, first, os.urandom(100_000))
        assert len(server.server.connections) == 1
        logged = [r for r in caplog.records if "malformed header block" in r.getMessage()]
        assert len(logged) == n + 1 and f"stream {sid} " in logged[-1].getMessage(), logged
        assert all(r.levelno == logging.DEBUG for r in logged)  # a peer may send these as fast as it likes
    # The first answer was PROTOCOL_ERROR (a late DATA frame may have drawn a STREAM_CLOSED since).
    again = await peer.connect_stream(echo)
    await exchange(peer, again, b"a new tunnel on the same connection")
    await exchange(peer, first, b"and the first one still")
    assert not peer.violations, peer.violations
    await peer.close()


@bounded(60)
async def test_a_peer_that_keeps_sending_malformed_requests_is_cut(pki, server, echo_app, caplog) -> None:
    """Each malformed request costs only its stream, but not without end (the "rapid reset" pattern): past
    REJECTED_STREAMS_BURST such streams in quick succession the connection ends with GOAWAY ENHANCE_YOUR_CALM
    and one warning; the resets before it are logged at debug only. Other connections are served all along."""
    caplog.set_level(logging.DEBUG, logger="hbone.connection")
    echo = f"127.0.0.1:{echo_app.port}"
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    first = await peer.connect_stream(echo)
    (flooded,) = server.server.connections
    other = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    other_tunnel = await other.open_stream(echo)
    reader, writer = stream_pair(other_tunnel)

    headers, _ = MALFORMED["uppercase header name"]
    # Well past the burst: the budget refills at REJECTED_STREAMS_PER_SECOND, and a slow machine must not
    # get through them all before it runs out.
    sent = [send_request(peer, headers) for _ in range(REJECTED_STREAMS_BURST + 500)]
    await peer.closed()
    assert len(peer.goaways) == 1 and peer.goaways[0][1] == ErrorCodes.ENHANCE_YOUR_CALM, peer.summary()
    # Cut once the burst is spent (later by what the budget refilled meanwhile), before the flood ends.
    last = peer.goaways[0][0]
    assert sent[REJECTED_STREAMS_BURST] <= last < sent[-1], (last, sent[REJECTED_STREAMS_BURST])
    assert set(peer.resets) == {sid for sid in sent if sid <= last}, peer.summary()  # RST_STREAM, then GOAWAY
    assert first not in peer.resets and "ENHANCE_YOUR_CALM" in flooded.close_reason, flooded.close_reason
    records = [r for r in caplog.records if r.name == "hbone.connection"]
    loud = [r.getMessage() for r in records if r.levelno > logging.DEBUG]
    assert len(loud) == 1 and "too many streams reset" in loud[0], loud
    debug = [r for r in records if r.levelno == logging.DEBUG and "malformed header block" in r.getMessage()]
    assert len(debug) == len(peer.resets)
    await others_go_on(pki, server, echo_app, flooded, (reader, writer), other)
    await peer.close()


@bounded(60)
async def test_a_peer_that_keeps_sending_bad_requests_is_cut(pki, server, echo_app, caplog) -> None:
    """Well-formed requests we answer 400 (not CONNECT) cost the peer only their stream too, and count against
    the same budget: a peer sending them without end is cut, and none of them is logged above debug."""
    caplog.set_level(logging.DEBUG, logger="hbone")
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    (flooded,) = server.server.connections
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "127.0.0.1:80")]
    sent = [send_request(peer, get, end_stream=True) for _ in range(REJECTED_STREAMS_BURST + 500)]
    await peer.closed()
    # The server ends the connection with our requests still unread, so its kernel may reset the socket before
    # the GOAWAY is read here: the reason is checked on the server's side.
    assert "ENHANCE_YOUR_CALM" in flooded.close_reason, flooded.close_reason
    assert peer.status(sent[0]) == 400
    assert len(peer.headers) >= REJECTED_STREAMS_BURST or peer.read_error is not None, peer.summary()
    loud = [r.getMessage() for r in caplog.records if r.name.startswith("hbone") and r.levelno > logging.DEBUG]
    assert len(loud) == 1 and "too many streams" in loud[0], loud
    await assert_still_serving(pki, server, echo_app)
    await peer.close()


def connect_and_cancel(peer: RawPeer, authority: str) -> int:
    """A valid CONNECT and, in the same write (so the server reads both before it can answer), its RST_STREAM
    CANCEL: what a client does that gives up at once, and the "rapid reset" pattern when done without end."""
    sid = peer.next_stream_id
    peer.next_stream_id += 2
    block = peer.encoder.encode([(":method", "CONNECT"), (":authority", authority)])
    peer.write(frame(HEADERS, END_HEADERS, sid, block) + RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
    return sid


@bounded(60)
async def test_a_peer_that_keeps_cancelling_its_connects_is_cut(pki, server, echo_app, caplog) -> None:
    """CVE-2023-44487 from the peer's side: each CONNECT it resets itself before our answer still reached
    `on_stream` (in ztunnel, a task and a dial to the application), and costs the peer nothing. Past
    CANCELLED_STREAMS_BURST of them in quick succession the connection ends with GOAWAY ENHANCE_YOUR_CALM and
    one warning; other connections are served all along."""
    caplog.set_level(logging.DEBUG, logger="hbone.connection")
    echo = f"127.0.0.1:{echo_app.port}"
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    first = await peer.connect_stream(echo)
    (flooded,) = server.server.connections
    other = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    reader, writer = stream_pair(await other.open_stream(echo))
    seen_before = server.streams_seen

    # Denied authorities: the server answers them without a dial, so only the resets are measured here.
    # Well past the burst: the budget refills at CANCELLED_STREAMS_PER_SECOND, and a slow machine must not
    # get through them all before it runs out.
    sent = [connect_and_cancel(peer, f"{DENIED_HOST}:80") for _ in range(CANCELLED_STREAMS_BURST + 1500)]
    await peer.closed()
    assert len(peer.goaways) == 1 and peer.goaways[0][1] == ErrorCodes.ENHANCE_YOUR_CALM, peer.summary()
    # Cut once the burst is spent (later by what the budget refilled meanwhile), before the flood ends, and
    # none of the streams after it reached the stream handler.
    last = peer.goaways[0][0]
    assert sent[CANCELLED_STREAMS_BURST] <= last < sent[-1], (last, sent[CANCELLED_STREAMS_BURST])
    assert server.streams_seen - seen_before == sent.index(last) + 1
    assert "ENHANCE_YOUR_CALM" in flooded.close_reason and "before they were answered" in flooded.close_reason
    assert first not in peer.resets
    loud = [r.getMessage() for r in caplog.records if r.name == "hbone.connection" and r.levelno > logging.DEBUG]
    assert len(loud) == 1 and "too many streams reset by it before they were answered" in loud[0], loud
    await others_go_on(pki, server, echo_app, flooded, (reader, writer), other)
    await peer.close()


@bounded(60)
async def test_a_client_that_cancels_now_and_then_keeps_its_connection(pki, server, echo_app) -> None:
    """What legitimate clients do (a gRPC client cancelling calls, curl aborting, an application giving up on
    a slow dial) never comes near the budget: cancelled CONNECTs, and tunnels reset once answered, cost
    nothing but themselves."""
    echo = f"127.0.0.1:{echo_app.port}"
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    first = await peer.connect_stream(echo)
    for _ in range(3):
        cancelled = [connect_and_cancel(peer, echo) for _ in range(30)]
        await peer.ping()  # the server has read them all
        assert not any(sid in peer.headers for sid in cancelled), peer.summary()  # reset before any answer
        answered = await peer.connect_stream(echo)
        await exchange(peer, answered, b"a tunnel between the cancels")
        peer.write(RstStreamFrame(answered, error_code=ErrorCodes.CANCEL).serialize())  # the end of a tunnel
        await exchange(peer, first, b"and the first one still")
    assert not peer.goaways and not peer.eof, peer.summary()
    (conn,) = server.server.connections
    assert not conn.is_closed
    assert not peer.violations, peer.violations
    await peer.close()


def test_the_reset_budget_is_a_token_bucket() -> None:
    budget = ResetBudget(burst=3, rate=2.0)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(100.4) is False  # 0.8 of a token back: not yet one
    assert budget.take(100.5) is True  # a whole one
    assert [budget.take(200.0) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more
    # The defaults: a legitimate client's races fit many times over; a flood is cut after a few hundred.
    assert 100 < REJECTED_STREAMS_BURST <= 1000 and REJECTED_STREAMS_PER_SECOND < REJECTED_STREAMS_BURST
    # The peer's own cancels: nghttp2's figures (Envoy's codec), which count every received reset.
    assert (CANCELLED_STREAMS_BURST, CANCELLED_STREAMS_PER_SECOND) == (1000, 33.0)


@bounded(60)
async def test_a_stream_over_the_limit_is_refused_and_the_connection_goes_on(pki, echo_app) -> None:
    limited = H2Settings(server_max_streams=2)
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER), settings=limited).start()
    echo = f"127.0.0.1:{echo_app.port}"
    peer = await RawPeer.connect(server.address, pki.client_ctx(CLIENT))
    a = await peer.connect_stream(echo)
    b = await peer.connect_stream(echo)
    # A third, with a header only it carries: the server must decode its block all the same, or the HPACK
    # references of the next block are off. DATA follows at once, as a client sends before any answer.
    c = peer.open_stream(echo, [("x-only-on-the-refused-stream", "1")])
    peer.send_data(c, b"early data on the refused stream")
    await peer.until(lambda: c in peer.resets, "RST_STREAM for the stream over the limit")
    await peer.ping()
    assert c not in peer.headers
    assert peer.resets[c] in (ErrorCodes.REFUSED_STREAM, ErrorCodes.STREAM_CLOSED)
    assert not peer.goaways and not peer.eof, peer.summary()
    for sid in (a, b):
        await exchange(peer, sid, os.urandom(50_000))
    # A slot frees up; the retry (same headers, so HPACK references to the refused block) gets through.
    peer.write(RstStreamFrame(a, error_code=ErrorCodes.CANCEL).serialize())
    retry = await peer.connect_stream(echo, [("x-only-on-the-refused-stream", "1")])
    await exchange(peer, retry, b"retried")
    await exchange(peer, b, b"b goes on")
    assert not peer.goaways and not peer.violations, peer.summary()
    await peer.close()
    await server.close()


async def test_header_list_over_64k_costs_only_its_connection(pki, server, echo_app) -> None:
    client = await raw(pki, server)
    big = [(f"x-filler-{i}", "v" * 1000) for i in range(70)]
    outcome = await client.request([(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo_app.port}"), *big])
    assert outcome.status is None and outcome.connection_closed
    await assert_still_serving(pki, server, echo_app)


async def test_refused_connections_in_a_row_make_one_warning(pki, server, echo_app, caplog) -> None:
    """Anyone can connect and fail a handshake as often as they like: twenty in a row make one warning line
    (then at most one per ten seconds, saying how many were held back), and the server goes on."""
    caplog.set_level(logging.INFO)
    for _ in range(20):
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    await assert_still_serving(pki, server, echo_app)
    assert sum("refused HBONE connection" in r.getMessage() for r in caplog.records) == 1


def test_a_throttled_log_line_says_how_many_were_held_back(caplog) -> None:
    logger = logging.getLogger("tests.throttled")
    caplog.set_level(logging.INFO, logger="tests.throttled")
    line = ThrottledLog(logger, logging.WARNING, interval=0.05)
    for n in range(5):
        line("refused %d", n)
    time.sleep(0.1)  # past the interval (not a measurement)
    line("refused %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused 5 (and 4 more like it since the last such line)",
    ]


@pytest.mark.parametrize(
    "payload",
    [os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"],
    ids=["garbage", "plain-http1", "broken-tls-record"],
)
async def test_non_tls_bytes_close_that_connection_with_one_log_line(pki, server, echo_app, caplog, payload) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(payload)
    await asyncio.wait_for(reader.read(), 5)  # whatever comes back (a TLS alert, or nothing), then EOF
    assert reader.at_eof()
    writer.close()
    await eventually(lambda: any("refused HBONE connection" in r.getMessage() for r in caplog.records),
                     "the refusal in the server's log")  # fmt: skip
    assert sum("refused HBONE connection" in r.getMessage() for r in caplog.records) == 1
    await assert_still_serving(pki, server, echo_app)


async def test_http1_inside_tls_costs_only_its_connection(pki, server, echo_app) -> None:
    reader, writer = await asyncio.open_connection(*server.address, ssl=pki.client_ctx(CLIENT), server_hostname="")
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.read(), 5)  # GOAWAY, then closed
    assert reader.at_eof()
    writer.close()
    await assert_still_serving(pki, server, echo_app)


async def test_client_that_stops_reading_holds_memory_bounded(pki, server, echo_app) -> None:
    """The application sends without end; the client reads nothing. Flow control must stop the sender
    after about one stream window plus socket buffers, and everything arrives intact once it reads."""
    total = 256 * 1024 * 1024
    sent = 0
    digest = hashlib.sha256()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = os.urandom(1 << 20)
        while sent < total:
            writer.write(chunk)
            digest.update(chunk)
            sent += len(chunk)
            await writer.drain()
        writer.write_eof()

    app = await TcpApp(firehose).start()
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    tunnel.pause_reading()  # a client that stops reading
    await asyncio.sleep(1.0)
    stalled_at = sent
    await asyncio.sleep(0.5)
    assert sent == stalled_at, "the sender was not stopped"
    # Window (4 MiB) + relay buffers + kernel socket buffers on both loopback sockets: far below 64 MiB.
    assert stalled_at < 64 * 1024 * 1024, stalled_at
    server_tunnel = server.relays[-1]
    assert server_tunnel.a_to_b == 0
    # Meanwhile the server keeps serving others.
    await assert_still_serving(pki, server, echo_app)
    reader, _writer = stream_pair(tunnel)
    tunnel.resume_reading()
    received = await asyncio.wait_for(read_all(reader), 60)
    assert received == (total, digest.hexdigest())
    conn.close()
    await app.close()
