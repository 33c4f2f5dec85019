"""Stand-ins for the waypoint's neighbours, at fixed addresses: a destination ztunnel or a network's
east-west gateway (an HBONE server relaying each CONNECT to a TCP address), and small HTTP/1.1 and HTTP/2
applications behind them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h11

from hbone.identity import Identity
from hbone.relay import Relay
from hbone.server import HboneServer, ServerIdentity
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel
from tests.support.pki import TestPki


@dataclass
class ConnectSeen:
    authority: str
    headers: dict[str, str]  # the last value of each request header


class StandInHbone:
    """An HBONE server at a fixed address that relays each CONNECT to a TCP address: the one `targets`
    maps the authority to, else the authority itself. As a gateway it relays inner TLS opaquely.

    `response_baggage` is added to the 200 (like a destination ztunnel with response baggage on)."""

    def __init__(
        self,
        pki: TestPki,
        identity: Identity,
        *,
        cluster: str = "cluster1",
        targets: dict[str, tuple[str, int]] | None = None,
        response_baggage: str | None = None,
    ) -> None:
        self.identity = identity
        self.targets = targets or {}
        self.response_baggage = response_baggage
        self.connects: list[ConnectSeen] = []
        chosen = ServerIdentity(pki.server_ctx(identity, cluster), identity)
        self.server = HboneServer(lambda _addr: chosen, self._on_stream, name=f"stand-in {identity}")
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> StandInHbone:
        await self.server.listen(host, port)
        return self

    def _on_stream(self, tunnel: Tunnel) -> None:
        headers = {k.decode(): v.decode("latin-1") for k, v in tunnel.request_headers}
        self.connects.append(ConnectSeen(tunnel.authority or "", headers))
        task = asyncio.get_running_loop().create_task(self._serve(tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, tunnel: Tunnel) -> None:
        assert tunnel.target is not None
        host, port = self.targets.get(tunnel.authority or "", (tunnel.target.host, tunnel.target.port))
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(Buffered, host, port)
        except OSError:
            tunnel.respond(503)
            return
        tunnel.respond(200, [("baggage", self.response_baggage)] if self.response_baggage else [])
        Relay().start(tunnel, transport)  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.server.shutdown(0.1)


@dataclass
class HttpApp:
    """An HTTP/1.1 application that says which endpoint it is (`x-endpoint` and the body).

    Paths: `/upload` answers `<bytes> <sha256>` of the body; `/slow` never answers; `/flaky` answers 503
    while `fail_next` > 0; anything else reads the body and answers 200 with the app's name."""

    name: str
    fail_next: int = 0
    requests: int = 0
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    server: asyncio.Server | None = None
    connections: int = 0  # TCP connections accepted
    close_after: int = 0  # > 0: answer `connection: close` to every close_after-th request of a connection
    # > 0: a connection that has served this many requests closes, unanswered, when the next one arrives (a
    # keep-alive timeout that crossed the request on the wire)
    hang_up_after: int = 0
    hung_up: int = 0
    live: Live = field(default_factory=lambda: Live())

    async def start(self, host: str, port: int) -> HttpApp:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.live.close()

    def drop_idle(self) -> int:
        """Close every connection that waits for its next request (a keep-alive timeout); how many."""
        return self.live.drop_idle()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with self.live.track(writer) as entry:
            await self._exchanges(reader, writer, entry)

    async def _exchanges(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, entry: LiveEntry) -> None:
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            while True:
                entry.idle = True
                event = await _next(conn, reader)
                entry.idle = False
                if not isinstance(event, h11.Request):
                    return
                if self.hang_up_after and served >= self.hang_up_after:
                    self.hung_up += 1
                    # Read the request whole first: closing with unread bytes would send a TCP RST instead
                    # of the FIN of a keep-alive timeout.
                    while isinstance(await _next(conn, reader), h11.Data):
                        pass
                    return
                served += 1
                self.requests += 1
                self.seen_headers.append({k.decode(): v.decode("latin-1") for k, v in event.headers})
                path = event.target.decode()
                if path.startswith("/slow"):
                    await reader.read()  # until the waypoint gives up and closes
                    return
                digest, n = hashlib.sha256(), 0
                while isinstance(body := await _next(conn, reader), h11.Data):
                    digest.update(body.data)
                    n += len(body.data)
                status, text = 200, self.name
                if path.startswith("/upload"):
                    text = f"{n} {digest.hexdigest()}"
                elif path.startswith("/flaky") and self.fail_next > 0:
                    self.fail_next -= 1
                    status, text = 503, "try again"
                payload = text.encode()
                headers = [("x-endpoint", self.name), ("content-length", str(len(payload)))]
                if self.close_after and served % self.close_after == 0:
                    headers.append(("connection", "close"))
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                writer.write(conn.send(h11.Data(data=payload)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()


@dataclass(eq=False)
class LiveEntry:
    writer: asyncio.StreamWriter
    idle: bool = False


class Live:
    """The open connections of a stand-in app, so that closing the app closes them too (the waypoint keeps
    upstream connections alive) and their handlers end on their own rather than being cancelled."""

    def __init__(self) -> None:
        self.entries: set[LiveEntry] = set()
        self.tasks: set[asyncio.Task[object]] = set()

    @contextlib.contextmanager
    def track(self, writer: asyncio.StreamWriter) -> Iterator[LiveEntry]:
        entry = LiveEntry(writer)
        task = asyncio.current_task()
        self.entries.add(entry)
        if task is not None:
            self.tasks.add(task)
        try:
            yield entry
        finally:
            self.entries.discard(entry)
            if task is not None:
                self.tasks.discard(task)

    def drop_idle(self) -> int:
        idle = [e for e in self.entries if e.idle]
        for e in idle:
            e.writer.close()
        return len(idle)

    async def close(self) -> None:
        for e in list(self.entries):
            e.writer.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2)


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(1 << 18))


class GrpcApp:
    """An HTTP/2 (prior knowledge) application in the style of gRPC: echoes the request message and ends
    with trailers `grpc-status: <status>`."""

    def __init__(self, grpc_status: int = 0) -> None:
        self.grpc_status = grpc_status
        self.server: asyncio.Server | None = None
        self.seen_headers: list[dict[str, str]] = []
        self.connections = 0  # HTTP/2 connections accepted
        self.live = Live()

    async def start(self, host: str, port: int) -> GrpcApp:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.live.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with self.live.track(writer):
            await self._streams(reader, writer)

    async def _streams(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        try:
            while data := await reader.read(1 << 16):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.seen_headers.append(dict(event.headers))  # type: ignore[arg-type]
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        body = bytes(bodies.pop(event.stream_id))
                        conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        conn.send_data(event.stream_id, body)
                        conn.send_headers(event.stream_id, [("grpc-status", str(self.grpc_status)),
                                                            ("grpc-message", "done")], end_stream=True)  # fmt: skip
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            return
        finally:
            writer.close()


class H2App:
    """An HTTP/2 (prior knowledge) application, as a connection handler, that answers each complete request
    with `answer(conn, stream_id)` (frames sent with h2's connection; None: never answers). It records the
    headers of the requests it got and the error codes of the RST_STREAMs it was sent."""

    def __init__(self, answer: Callable[[h2.connection.H2Connection, int], None] | None = None) -> None:
        self.answer = answer
        self.requests: list[dict[str, str]] = []
        self.resets: list[int] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(1 << 16):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.requests.append(dict(event.headers))  # type: ignore[arg-type]
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and self.answer is not None:
                    self.answer(conn, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.resets.append(event.error_code)
            writer.write(conn.data_to_send())
            await writer.drain()


# -- in-memory streams for the waypoint's HTTP/1.1 sides without processes ------------------------------------


class FakeWriter:
    """What a `StreamWriter` offers the HTTP/1.1 sides; keeps what they write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: list[bytes]) -> None:
        for p in parts:
            self.data += p

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        pass


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader
