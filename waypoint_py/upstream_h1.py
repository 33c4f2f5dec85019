"""HTTP/1.1 to an endpoint over one upstream stream, one request per stream (`connection: close`), so every
request is balanced on its own."""

from __future__ import annotations

import asyncio

import h11

from waypoint_py.errors import UpstreamProtocolError, UpstreamReset
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first
from waypoint_py.streams import READ_SIZE, write_parts

MAX_HEAD_BYTES = 64 * 1024


class Http1Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._trailers: Headers | None = None

    @property
    def trailers(self) -> Headers | None:
        return self._trailers

    async def send_head(self, head: RequestHead) -> None:
        headers: Headers = [(b"host", head.authority.encode("latin-1")), *head.headers]
        if head.has_body and first(head.headers, b"content-length") is None:
            headers.append((b"transfer-encoding", b"chunked"))
        headers.append((b"connection", b"close"))
        request = h11.Request(method=head.method.encode("ascii"), target=head.path.encode("latin-1"), headers=headers)
        await self._send(request)

    async def send_body(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end_body(self, trailers: Headers | None) -> None:
        await self._send(h11.EndOfMessage())

    async def response_head(self) -> ResponseHead:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: we already answered the client's Expect ourselves
            if isinstance(event, h11.Response):
                return ResponseHead(event.status_code, end_to_end(list(event.headers)))
            raise UpstreamReset(f"upstream closed the connection before the response ({type(event).__name__})")

    async def read_body(self) -> bytes | None:
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._trailers = list(event.headers) or None
            return None
        raise UpstreamReset("upstream closed the connection in the middle of the response body")

    async def _send(self, event: h11.Event) -> None:
        if self.writer.is_closing():
            raise UpstreamReset("upstream stream is closed")
        try:
            write_parts(self.writer, self.conn.send_with_data_passthrough(event))
            await self.writer.drain()
        except h11.LocalProtocolError as exc:
            raise UpstreamReset(f"cannot send the request over HTTP/1.1: {exc}") from exc
        except (ConnectionError, OSError) as exc:
            raise UpstreamReset(f"upstream stream lost: {exc}") from exc

    async def _next_event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"upstream sent malformed HTTP/1.1: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    raise UpstreamReset(f"upstream stream lost: {exc}") from exc
                self.conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                raise UpstreamProtocolError("upstream sent more than one response")
            return event  # type: ignore[return-value]
