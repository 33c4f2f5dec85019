"""Clients that reach a waypoint the way a ztunnel does (HBONE with a workload's certificate) and then
speak HTTP/1.1 (h11) or HTTP/2 (h2) inside the tunnel."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11

from hbone.client import dial
from hbone.connection import HboneConnection
from hbone.identity import Identity
from hbone.tunnel import Tunnel
from tests.support.apps import stream_pair
from tests.support.pki import TestPki


async def open_tunnel(pki: TestPki, client: Identity, waypoint: tuple[str, int], waypoint_identity: Identity,
                      authority: str, headers: list[tuple[str, str]] | None = None, source_ip: str | None = None
                      ) -> tuple[HboneConnection, Tunnel]:  # fmt: skip
    conn = await dial(waypoint, pki.client_ctx(client), {waypoint_identity}, local_identity=client, source_ip=source_ip)
    tunnel = await conn.open_stream(authority, headers or [])
    return conn, tunnel


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Http1Client:
    """HTTP/1.1 over one tunnel, keep-alive."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.reader, self.writer = stream_pair(tunnel)
        self.conn = h11.Connection(h11.CLIENT)

    async def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(1 << 18))

    async def read_response(self) -> Response:
        event = await self._next()
        while isinstance(event, h11.InformationalResponse):
            event = await self._next()
        assert isinstance(event, h11.Response), event
        body = bytearray()
        while isinstance(part := await self._next(), h11.Data):
            body += part.data
        assert isinstance(part, h11.EndOfMessage), part
        headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Response(event.status_code, headers, bytes(body))

    async def request(self, method: str, path: str, host: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Response:  # fmt: skip
        all_headers = [("host", host), *(headers or [])]
        if body or method in ("POST", "PUT"):
            all_headers.append(("content-length", str(len(body))))
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=all_headers)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        return await self.read_response()

    async def upload(self, path: str, host: str, total: int, seed: int = 1,
                     expect_continue: bool = False) -> tuple[Response, str]:  # fmt: skip
        """A chunked upload of `total` seeded random bytes, streamed; returns the response and their sha256."""
        headers = [("host", host), ("transfer-encoding", "chunked")]
        if expect_continue:
            headers.append(("expect", "100-continue"))
        self.writer.write(self.conn.send(h11.Request(method="POST", target=path, headers=headers)))
        await self.writer.drain()
        if expect_continue:
            event = await self._next()
            assert isinstance(event, h11.InformationalResponse) and event.status_code == 100, event
        rng = random.Random(seed)
        digest = hashlib.sha256()
        sent = 0
        while sent < total:
            chunk = rng.randbytes(min(1 << 20, total - sent))
            digest.update(chunk)
            self.writer.write(self.conn.send(h11.Data(data=chunk)))
            sent += len(chunk)
            await self.writer.drain()
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        return await self.read_response(), digest.hexdigest()

    def close(self) -> None:
        self.writer.close()


@dataclass
class GrpcResult:
    headers: dict[str, str]
    data: bytes
    trailers: dict[str, str]


async def grpc_calls(tunnel: Tunnel, authority: str, path: str, messages: list[bytes]) -> list[GrpcResult]:
    """Unary gRPC-style calls (length-prefixed message, te: trailers), all at once on one HTTP/2 connection
    with prior knowledge; results in the order of `messages`."""
    reader, writer = stream_pair(tunnel)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    order = []
    for message in messages:
        sid = conn.get_next_available_stream_id()
        order.append(sid)
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", authority), (":path", path),
                   ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        conn.send_headers(sid, headers)
        conn.send_data(sid, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
    writer.write(conn.data_to_send())
    results = {sid: GrpcResult({}, b"", {}) for sid in order}
    data = {sid: bytearray() for sid in order}
    open_streams = set(order)
    while open_streams:
        chunk = await reader.read(1 << 16)
        assert chunk, "the waypoint closed the HTTP/2 connection before the calls ended"
        for event in conn.receive_data(chunk):
            sid = getattr(event, "stream_id", 0)
            if isinstance(event, h2.events.ResponseReceived):
                results[sid].headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                data[sid] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                results[sid].trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                open_streams.discard(sid)
        writer.write(conn.data_to_send())
    writer.close()
    for sid in order:
        results[sid].data = bytes(data[sid])
    return [results[sid] for sid in order]


_STREAM_EVENTS = (h2.events.InformationalResponseReceived, h2.events.ResponseReceived, h2.events.DataReceived,
                  h2.events.TrailersReceived, h2.events.StreamEnded, h2.events.StreamReset)  # fmt: skip


class H2Client:
    """HTTP/2 with prior knowledge over one tunnel, frame events one at a time: for tests that look at how an
    answer is framed (END_STREAM on HEADERS, a 100 Continue) or that give up on a stream (RST_STREAM)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.reader, self.writer = stream_pair(tunnel)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self._events: list[h2.events.Event] = []

    def request(self, authority: str, path: str, headers: list[tuple[str, str]] | None = None,
                body: bytes | None = None) -> int:  # fmt: skip
        """A POST; its body (if any) ends the stream, without one the stream stays open. The stream id."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", authority),
                                     (":path", path), *(headers or [])])  # fmt: skip
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        return sid

    def send_body(self, sid: int, body: bytes) -> None:
        self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())

    def reset(self, sid: int) -> None:
        """Give up on the stream, as a gRPC client past its deadline does."""
        self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self.writer.write(self.conn.data_to_send())

    async def next_event(self, sid: int) -> h2.events.Event:
        """The next event of stream `sid`: a response (informational or final), data, trailers, its end or reset."""
        while True:
            for i, event in enumerate(self._events):
                if getattr(event, "stream_id", None) == sid:
                    return self._events.pop(i)
            data = await self.reader.read(1 << 16)
            assert data, "the waypoint closed the HTTP/2 connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, _STREAM_EVENTS):
                    self._events.append(event)
            self.writer.write(self.conn.data_to_send())

    def close(self) -> None:
        self.writer.close()
