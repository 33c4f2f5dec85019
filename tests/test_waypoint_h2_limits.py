"""The waypoint's HTTP/2 inside a tunnel against clients that make it spend without end: PINGs whose answers
they never read, streams they reset as soon as they open them ("rapid reset", CVE-2023-44487), request
bodies sent on many streams at once to an upstream that takes nothing. After each, the waypoint serves the
next client as usual."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes

from hbone.connection import CANCELLED_STREAMS_BURST, MAX_QUEUED_CONTROL_FRAMES
from hbone.server import HboneServer, ServerIdentity
from hbone.tunnel import Tunnel
from tests.support.apps import stream_pair
from tests.support.http_clients import grpc_calls, open_tunnel
from tests.support.pki import TestPki
from tests.support.rawpeer import PREFACE, RawPeer, frame
from tests.support.waiting import eventually
from tests.support.waypoint_mesh import (
    CLIENT_ID,
    ENDPOINTS,
    HBONE_PORT,
    WAYPOINT_ID,
    Endpoints,
    Topology,
    custom_upstream,
    fqdn,
    ident,
)
from tests.support.waypoint_proc import WaypointProcess, total
from waypoint_py.h2_driver import (
    DOWNSTREAM_CONNECTION_WINDOW,
    DOWNSTREAM_STREAM_WINDOW,
    MAX_CONCURRENT_STREAMS,
    H2Driver,
    H2Stream,
)

KiB = 1024
MiB = 1024 * KiB
DEADLINE = 10.0  # for what the test waits on, never a measure of anything
PING = frame(0x6, 0, 0, b"12345678")  # 17 bytes, and so is its answer
SETTINGS = frame(0x4, 0, 0)
GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


class Inner:
    """An HTTP/2 client inside one tunnel (h2 frames it), reading only when a test waits for something."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.reader, self.writer = stream_pair(tunnel)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.eof = False
        self.send()

    def send(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def until(self, cond: Callable[[], object], what: str) -> None:
        """Read (acknowledging DATA at once) until `cond` holds."""

        async def read() -> None:
            while not cond():
                data = await self.reader.read(1 << 16)
                if not data:
                    self.eof = True
                    assert cond(), f"the waypoint ended the connection before {what}"
                    return
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    self.events.append(event)
                self.send()

        try:
            await asyncio.wait_for(read(), DEADLINE)
        except TimeoutError:
            raise AssertionError(f"not within {DEADLINE:g}s: {what}") from None

    def of(self, kind: type[h2.events.Event], sid: int | None = None) -> list[h2.events.Event]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", 0) == sid)]

    async def ping(self) -> None:
        """A PING round trip: the waypoint has handled everything sent before it."""
        token = os.urandom(8)
        self.conn.ping(token)
        self.send()
        await self.until(lambda: any(e.ping_data == token for e in self.of(h2.events.PingAckReceived)), "a PING ACK")

    def request(self, authority: str, path: str) -> int:
        """A POST whose body is to come."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", authority),
                                     (":path", path), *GRPC])  # fmt: skip
        return sid

    def open_and_reset(self, authority: str, count: int) -> None:
        """`count` times HEADERS (a body to come) and RST_STREAM(CANCEL) at once: the "rapid reset" pattern."""
        for _ in range(count):
            self.conn.reset_stream(self.request(authority, "/pkg.Things/Cancelled"), ErrorCodes.CANCEL)
        self.send()

    def fill(self, sids: list[int]) -> int:
        """As much DATA on each stream as the waypoint's windows allow; how much that was."""
        sent = 0
        for sid in sids:
            while (room := min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)) > 0:
                self.conn.send_data(sid, bytes(room))
                sent += room
        self.send()
        return sent

    async def upload(self, authority: str, size: int) -> tuple[str, bytes]:
        """A request with a body of `size` bytes sent as the windows open; the response's status and body."""
        sid = self.request(authority, "/pkg.Things/Upload")
        left = size
        while left:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, left)
            if room <= 0:
                await self.until(lambda: self.conn.local_flow_control_window(sid) > 0, "window for the body")
                continue
            self.conn.send_data(sid, bytes(room))
            left -= room
            self.send()
        self.conn.end_stream(sid)
        self.send()
        await self.until(lambda: self.of(h2.events.StreamEnded, sid) or self.of(h2.events.StreamReset, sid),
                         "the response")  # fmt: skip
        (head,) = self.of(h2.events.ResponseReceived, sid)
        body = b"".join(e.data for e in self.of(h2.events.DataReceived, sid))  # type: ignore[attr-defined]
        return dict(head.headers)[":status"], body  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()


async def served_normally(pki: TestPki, topo: Topology, waypoint: WaypointProcess) -> None:
    """A new client's gRPC call goes through as usual."""
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("grpc"))
    (result,) = await asyncio.wait_for(grpc_calls(tunnel, "grpc:50051", "/echo.Echo/Say", [b"still here"]), DEADLINE)
    assert result.headers[":status"] == "200" and result.trailers["grpc-status"] == "0"
    assert result.data == b"\x00" + len(b"still here").to_bytes(4, "big") + b"still here"


def custom_requests(waypoint: WaypointProcess) -> float:
    return total(waypoint.scrape(), "istio_requests_total", destination_service=fqdn("custom"))


class HeldConnects:
    """The `custom` endpoint's ztunnel, holding every CONNECT unanswered until `release`: the waypoint's
    handlers of requests for `custom` wait in their upstream dial for as long as a test likes."""

    def __init__(self) -> None:
        self.held: list[Tunnel] = []
        self.released = False

    def on_stream(self, tunnel: Tunnel) -> None:
        self.held.append(tunnel)
        if self.released:
            tunnel.respond(503)

    def release(self) -> None:
        """Refuse (503) every CONNECT held, and those to come: the dials fail and the handlers end."""
        self.released = True
        for tunnel in self.held:
            if not tunnel.finished:
                tunnel.respond(503)


@contextlib.asynccontextmanager
async def held_connects(topo: Topology, pki: TestPki) -> AsyncIterator[HeldConnects]:
    held = HeldConnects()
    identity = ServerIdentity(pki.server_ctx(ident("custom")), ident("custom"))
    server = HboneServer(lambda _addr: identity, held.on_stream, name="held custom")
    await server.listen(topo.ip(ENDPOINTS["custom"][0]), HBONE_PORT)
    try:
        yield held
    finally:
        held.release()
        await server.shutdown(0.1)


async def test_client_that_never_reads_the_answers_it_asks_for_is_cut_off(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    """PINGs on a tunnel that grants the waypoint no window to answer in: past its write buffer's high-water mark
    (1 MiB) the waypoint takes MAX_QUEUED_CONTROL_FRAMES more answers, then sends GOAWAY ENHANCE_YOUR_CALM and,
    as the client does not read that either, resets the tunnel a moment later. A client that reads its answers
    sends as many PINGs as it likes."""
    peer = await RawPeer.connect(waypoint.inbound, pki.client_ctx(CLIENT_ID), window=0)
    try:
        sid = await peer.connect_stream(topo.authority("echo"))
        await peer.send_when_allowed(sid, PREFACE + SETTINGS)
        pings = PING * (256 * KiB // len(PING))
        for _ in range(8):  # 2 MiB of PINGs, well past 1 MiB of answers and MAX_QUEUED_CONTROL_FRAMES more
            await peer.send_when_allowed(sid, pings)
        await peer.until(lambda: sid in peer.resets, "the waypoint to give up on the tunnel")
        assert not peer.data[sid]  # nothing ever reached the client
    finally:
        await peer.close()
    (warning,) = [line for line in waypoint.log().splitlines() if "does not read" in line]
    assert "ENHANCE_YOUR_CALM" in warning

    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("grpc"))
    client = Inner(tunnel)
    asked = 0
    while asked <= MAX_QUEUED_CONTROL_FRAMES + 1000:  # 1000 at a time, each batch read before the next
        for _ in range(1000):
            client.conn.ping(os.urandom(8))
        asked += 1000
        client.send()
        await client.until(lambda: len(client.of(h2.events.PingAckReceived)) == asked, "the PING answers")  # noqa: B023
    status, _ = await client.upload("grpc:50051", 5)
    assert status == "200"
    client.close()
    await served_normally(pki, topo, waypoint)


async def test_rapid_reset_ends_the_connection(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                               endpoints: Endpoints) -> None:  # fmt: skip
    """Streams opened and reset at once, their handlers still waiting on the upstream: past the budget of streams
    reset before their response (CANCELLED_STREAMS_BURST, as on HBONE) the connection ends with GOAWAY
    ENHANCE_YOUR_CALM."""
    async with held_connects(topo, pki):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = Inner(tunnel)
        client.open_and_reset("custom", 2 * CANCELLED_STREAMS_BURST)
        await client.until(lambda: client.of(h2.events.ConnectionTerminated), "GOAWAY")
        (goaway,) = client.of(h2.events.ConnectionTerminated)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
        await client.until(lambda: client.eof, "the end of the tunnel")
    assert waypoint.log().count("too many streams reset by it before their response") == 1
    await served_normally(pki, topo, waypoint)


async def test_handlers_of_reset_streams_count_against_max_concurrent_streams(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    """h2 forgets a stream the client reset, but its handler goes on (routing, dialling the upstream): no more
    than MAX_CONCURRENT_STREAMS handlers run at once. A stream reset while it waits for one never starts; one
    that is not starts once a handler is done."""
    before = custom_requests(waypoint)
    async with held_connects(topo, pki) as upstream:
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = Inner(tunnel)
        client.open_and_reset("custom", 3 * MAX_CONCURRENT_STREAMS)  # under the budget of resets
        waits = client.request("custom", "/pkg.Things/Waits")
        client.conn.end_stream(waits)
        client.send()
        await client.ping()  # the waypoint has seen every one of them, its handlers all waiting on the dial
        await eventually(lambda: upstream.held, "the waypoint dials the endpoint")
        upstream.release()
        await client.until(lambda: client.of(h2.events.StreamEnded, waits), "an answer to the stream that waited")
        (head,) = client.of(h2.events.ResponseReceived, waits)
        assert dict(head.headers)[":status"] == "503"  # type: ignore[attr-defined]  # the endpoint refuses now
        started = MAX_CONCURRENT_STREAMS + 1  # the first streams reset, and the one that waited
        await eventually(lambda: custom_requests(waypoint) - before >= started, "the handlers end")
        await served_normally(pki, topo, waypoint)  # and whatever else was to end has ended too
        assert custom_requests(waypoint) - before == started
        await client.ping()  # under the budget of resets: the connection goes on
        client.close()


async def test_a_client_connection_holds_at_most_its_window(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                            endpoints: Endpoints) -> None:  # fmt: skip
    """Request bodies on many streams to an upstream that takes nothing: what one client connection (one tunnel)
    can make the waypoint hold is its HTTP/2 connection window, about 1 MiB (Envoy's per-connection buffer
    limit), not one window per stream. A body bigger than the windows still goes through as they open."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()  # takes nothing, answers nothing
        await reader.read(1)  # until the connection is closed

    async with custom_upstream(topo, pki, silent):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = Inner(tunnel)
        await client.until(lambda: client.of(h2.events.WindowUpdated, 0), "the waypoint's connection window")
        sids = [client.request("custom", "/pkg.Things/Stuck") for _ in range(8)]
        sent = client.fill(sids)
        for _ in range(2):  # what the waypoint gives back: only what went upstream before the upstream stopped
            await client.ping()
            sent += client.fill(sids)
        assert sent <= 3 * MiB // 2, f"one client connection made the waypoint take {sent} bytes"
        client.close()

    async def counts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sizes: dict[int, int] = {}
        while True:
            writer.write(conn.data_to_send())
            if not (data := await reader.read(1 << 16)):
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    sizes[event.stream_id] = sizes.get(event.stream_id, 0) + len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    conn.send_headers(event.stream_id, [(":status", "200")])
                    conn.send_data(event.stream_id, str(sizes.pop(event.stream_id, 0)).encode(), end_stream=True)

    async with custom_upstream(topo, pki, counts):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = Inner(tunnel)
        assert await client.upload("custom", 4 * MiB) == ("200", str(4 * MiB).encode())
        client.close()
    await served_normally(pki, topo, waypoint)


async def test_credit_owed_goes_back_when_unread_bodies_fill_the_connection_window() -> None:
    """A request whose body the waypoint read (credit owed, under half the window: h2 has not given it back)
    waits for the connection window, which bodies of requests whose handlers do not read (they wait
    upstream) have just filled. Nothing more is read, so h2 would never give the owed credit back: the
    waypoint's HTTP/2 does, once less than a quarter of the window is left. (The driver itself, over a
    real TCP connection, with a plain h2 client.)"""
    tasks: set[asyncio.Task[None]] = set()
    taken = 0

    def on_stream(stream: H2Stream) -> None:
        async def drain() -> None:
            nonlocal taken
            while (data := await stream.read()) is not None:
                taken += len(data)

        if dict(stream.headers)[b":path"] == b"/read":
            tasks.add(asyncio.get_running_loop().create_task(drain()))
        # "/hold": the body waits in the stream, unread, as behind an upstream that takes nothing

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await H2Driver(reader, writer, client=False, on_stream=on_stream).run()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()

    async def exchange(cond: Callable[[], object], what: str) -> None:
        async def loop() -> None:
            while True:
                writer.write(client.data_to_send())
                if cond():
                    return
                try:  # (what `cond` waits for may happen on the server's side, with nothing sent to us)
                    data = await asyncio.wait_for(reader.read(1 << 16), 0.05)
                except TimeoutError:
                    continue
                assert data, f"the connection ended before {what}"
                client.receive_data(data)

        try:
            await asyncio.wait_for(loop(), DEADLINE)
        except TimeoutError:
            raise AssertionError(f"not within {DEADLINE:g}s: {what}") from None

    def post(path: str, size: int) -> None:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", path)])
        while size:
            n = min(size, client.max_outbound_frame_size)
            client.send_data(sid, bytes(n))
            size -= n

    try:
        window = DOWNSTREAM_CONNECTION_WINDOW
        await exchange(lambda: client.outbound_flow_control_window == window, "the waypoint's connection window")
        post("/read", 100 * KiB)
        await exchange(lambda: taken == 100 * KiB, "the first body read")
        left = window - 100 * KiB
        while left:  # fill the rest of the connection window with bodies nobody reads
            n = min(left, DOWNSTREAM_STREAM_WINDOW)
            post("/hold", n)
            left -= n
        assert client.outbound_flow_control_window == 0
        await exchange(lambda: client.outbound_flow_control_window >= 100 * KiB, "the owed connection credit")
    finally:
        writer.close()
        server.close()
        for task in tasks:
            task.cancel()
