"""HTTP/2 (prior knowledge) to an endpoint over one upstream stream: what an HTTP/2 client (gRPC) sent us
goes on as HTTP/2, trailers included."""

from __future__ import annotations

import asyncio
import contextlib

from waypoint_py.errors import UpstreamProtocolError, UpstreamReset
from waypoint_py.h2_driver import H2Driver, H2Stream, StreamGone
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end


class Http2Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.driver = H2Driver(reader, writer, client=True)
        self._reader_task = asyncio.get_running_loop().create_task(self.driver.run())
        self.stream: H2Stream | None = None

    @property
    def trailers(self) -> Headers | None:
        return self.stream.trailers if self.stream is not None else None

    async def send_head(self, head: RequestHead) -> None:
        headers: Headers = [
            (b":method", head.method.encode("ascii")),
            (b":scheme", head.scheme.encode("ascii")),
            (b":authority", head.authority.encode("latin-1")),
            (b":path", head.path.encode("latin-1")),
            *end_to_end(head.headers, keep_te_trailers=True),
        ]
        try:
            self.stream = self.driver.open_stream(headers, end_stream=not head.has_body)
            await self.driver.drain()
        except StreamGone as exc:
            raise UpstreamReset(str(exc)) from exc

    async def send_body(self, data: bytes) -> None:
        assert self.stream is not None
        try:
            await self.driver.send_data(self.stream, data)
        except StreamGone as exc:
            raise UpstreamReset(str(exc)) from exc

    async def end_body(self, trailers: Headers | None) -> None:
        stream = self.stream
        assert stream is not None
        if stream.ended_with_headers:
            return
        try:
            if trailers:
                self.driver.send_headers(stream, end_to_end(trailers), end_stream=True)
            else:
                self.driver.end_stream(stream)
        except StreamGone as exc:
            raise UpstreamReset(str(exc)) from exc

    async def response_head(self) -> ResponseHead:
        assert self.stream is not None
        try:
            headers = await self.stream.response
        except StreamGone as exc:
            raise UpstreamReset(f"upstream HTTP/2 stream ended before the response: {exc}") from exc
        status = next((v for k, v in headers if k == b":status"), None)
        if status is None or not status.isdigit():
            raise UpstreamProtocolError("upstream HTTP/2 response has no valid :status")
        return ResponseHead(int(status), end_to_end(headers))

    async def read_body(self) -> bytes | None:
        assert self.stream is not None
        try:
            return await self.stream.read()
        except StreamGone as exc:
            raise UpstreamReset(f"upstream HTTP/2 stream ended in the middle of the response: {exc}") from exc

    async def close(self) -> None:
        self.driver.close("request done")
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
