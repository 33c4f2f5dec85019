"""asyncio streams over any transport (a CONNECT tunnel, or a TCP socket), and HTTP/2 preface sniffing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# A StreamReader pauses its transport at twice this many buffered bytes; with a tunnel that stops the
# WINDOW_UPDATEs, so a client that sends faster than we forward is held by HTTP/2 flow control.
READ_LIMIT = 256 * 1024
READ_SIZE = 256 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Below this, pieces of one HTTP event (chunk header, data, CRLF) are joined into one write: on a tunnel
# every write is a DATA frame (and a TLS record), so three tiny frames would cost more than the copy.
JOIN_LIMIT = 64 * 1024


class WatchedProtocol(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol that also tells `on_end` (when set) that the peer ended or the transport is
    gone: a pooled upstream connection that ends while idle leaves the pool at once."""

    on_end: Callable[[], None] | None = None

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if self.on_end is not None:
            self.on_end()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_end is not None:
            self.on_end()


def open_streams(transport: asyncio.Transport) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    protocol = WatchedProtocol(reader)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def open_tcp_streams(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection`, with a `WatchedProtocol`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    transport, protocol = await loop.create_connection(lambda: WatchedProtocol(reader), host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def watched(writer: asyncio.StreamWriter) -> WatchedProtocol | None:
    transport = getattr(writer, "transport", None)
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, WatchedProtocol) else None


async def sniff(reader: asyncio.StreamReader) -> bytes:
    """Read until the first bytes tell HTTP/2 prior knowledge (the client preface) from HTTP/1.1.

    Returns what was read, which the protocol parser must be fed first."""
    seen = b""
    while len(seen) < len(H2_PREFACE) and H2_PREFACE.startswith(seen):
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            break
        seen += chunk
    return seen


def is_h2(first_bytes: bytes) -> bool:
    return first_bytes.startswith(H2_PREFACE)


def write_parts(writer: asyncio.StreamWriter, parts: list[bytes]) -> None:
    """Write the pieces of an HTTP/1.1 message, copying only small pieces together."""
    if not parts:
        return
    if len(parts) == 1:
        writer.write(parts[0])
    elif sum(len(p) for p in parts) <= JOIN_LIMIT:
        writer.write(b"".join(parts))
    else:
        writer.writelines(parts)
