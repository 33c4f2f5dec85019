"""Small TCP applications and an HBONE test server, all in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from hbone.connection import H2Settings
from hbone.identity import Identity
from hbone.relay import Relay
from hbone.server import HboneServer, ServerIdentity
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel

CHUNK = 256 * 1024


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes: chunks that differ, so reordering would show in a hash."""
    return random.Random(seed).randbytes(size)


async def send_pattern(writer: asyncio.StreamWriter, seed: int, total: int) -> str:
    """Write `total` bytes of seeded data with drain; returns their sha256."""
    digest = hashlib.sha256()
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        size = min(total - sent, rng.choice((1, 1000, 16384, CHUNK, 4 * CHUNK)))
        chunk = rng.randbytes(size)
        digest.update(chunk)
        writer.write(chunk)
        sent += size
        await writer.drain()
    return digest.hexdigest()


async def read_all(reader: asyncio.StreamReader) -> tuple[int, str]:
    digest = hashlib.sha256()
    n = 0
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
        n += len(chunk)
    return n, digest.hexdigest()


def stream_pair(tunnel: asyncio.Transport) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a tunnel (or any transport), like asyncio.open_connection gives."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    protocol = asyncio.StreamReaderProtocol(reader)
    tunnel.set_protocol(protocol)
    protocol.connection_made(tunnel)
    return reader, asyncio.StreamWriter(tunnel, protocol, reader, loop)


@dataclass
class TcpApp:
    """A TCP server whose per-connection behaviour is a coroutine; records what it saw."""

    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]
    server: asyncio.Server | None = None
    results: list[object] = field(default_factory=list)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> TcpApp:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                self.results.append(await self.handler(reader, writer))  # type: ignore[misc]
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self.results.append(exc)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, host, port, limit=1 << 20)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Echo until EOF, then half-close back."""
    n = 0
    while chunk := await reader.read(1 << 20):
        n += len(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    return n


async def digest_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, str]:
    """Read to EOF, then answer `<bytes> <sha256>`."""
    n, hexdigest = await read_all(reader)
    writer.write(f"{n} {hexdigest}".encode())
    await writer.drain()
    return n, hexdigest


class TunnelServer:
    """An HBONE server whose streams go to the TCP address in their authority (like a destination
    ztunnel, without the mesh): 401 for denied authorities, 503 when the target does not answer.

    `route` maps a stream to the TCP address it goes to instead, as a destination ztunnel maps a
    `<service hostname>:<port>` authority to its local pod's target port.
    """

    def __init__(
        self,
        identity: Identity,
        context_for: Callable[[], object],
        *,
        deny: Callable[[Tunnel], bool] = lambda t: False,
        settings: H2Settings | None = None,
        route: Callable[[Tunnel], tuple[str, int]] | None = None,
    ) -> None:
        self.identity = identity
        self.deny = deny
        self.route = route
        self.streams_seen = 0
        self.peak_streams_per_connection = 0
        self.relays: list[Relay] = []
        chosen = ServerIdentity(context_for(), identity)  # type: ignore[arg-type]
        self.server = HboneServer(lambda _addr: chosen, self._on_stream, settings=settings, name="test-server")
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> TunnelServer:
        srv = await self.server.listen(host, port)
        self.address = srv.sockets[0].getsockname()[:2]
        return self

    def _on_stream(self, tunnel: Tunnel) -> None:
        self.streams_seen += 1
        self.peak_streams_per_connection = max(
            self.peak_streams_per_connection, tunnel.connection.active_streams
        )
        task = asyncio.get_running_loop().create_task(self._serve(tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, tunnel: Tunnel) -> None:
        if self.deny(tunnel):
            tunnel.respond(401)
            return
        assert tunnel.target is not None
        host, port = self.route(tunnel) if self.route else (tunnel.target.host, tunnel.target.port)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(Buffered, host, port), 10)
        except (OSError, TimeoutError):
            tunnel.respond(503)
            return
        tunnel.respond(200, [("baggage", "k8s.cluster.name=test")])
        relay = Relay()
        self.relays.append(relay)
        relay.start(tunnel, transport)  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.server.shutdown(0.1)
