"""HTTP/2 (prior knowledge) to an endpoint: what an HTTP/2 client (gRPC) sent us goes on as HTTP/2, trailers
included. Each request is one stream on an HTTP/2 connection to its endpoint that `upstream_pool` shares
between requests (up to a bound of concurrent streams)."""

from __future__ import annotations

from h2.errors import ErrorCodes

from waypoint_py.errors import UpstreamClosed, UpstreamProtocolError, UpstreamReset
from waypoint_py.h2_driver import H2Driver, H2Stream, StreamGone
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end


class Http2Upstream:
    def __init__(self, driver: H2Driver) -> None:
        self.driver = driver
        self.stream: H2Stream | None = None

    @property
    def trailers(self) -> Headers | None:
        return self.stream.trailers if self.stream is not None else None

    @property
    def nothing_received(self) -> bool:
        """No response head came back on this stream (the connection closed, or the stream was refused)."""
        return self.stream is None or not self.stream.response.done() or self.stream.response.exception() is not None

    async def send_head(self, head: RequestHead, end: bool = False) -> None:
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
            raise self._failure(str(exc)) from exc

    async def send_body(self, data: bytes) -> None:
        assert self.stream is not None
        try:
            await self.driver.send_data(self.stream, data)
        except StreamGone as exc:
            raise self._failure(str(exc)) from exc

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
            raise self._failure(str(exc)) from exc

    async def response_head(self) -> ResponseHead:
        assert self.stream is not None
        try:
            headers = await self.stream.response
        except StreamGone as exc:
            raise self._failure(f"upstream HTTP/2 stream ended before the response: {exc}") from exc
        status = next((v for k, v in headers if k == b":status"), None)
        if status is None or len(status) != 3 or not status.isdigit():  # (RFC 9110 §15: three digits)
            raise UpstreamProtocolError("upstream HTTP/2 response has no valid :status")
        return ResponseHead(int(status), end_to_end(headers))

    def body_ready(self) -> bool:
        stream = self.stream
        return (stream is None or bool(stream._inbox) or stream.remote_ended or stream.reset_code is not None
                or self.driver.closed)  # fmt: skip

    async def read_body(self) -> bytes | None:
        assert self.stream is not None
        try:
            return await self.stream.read()
        except StreamGone as exc:
            raise self._failure(f"upstream HTTP/2 stream ended in the middle of the response: {exc}") from exc

    def _failure(self, message: str) -> UpstreamReset:
        # The whole connection ended (Envoy's "connection termination", UC), or only this stream was reset (UR).
        return (UpstreamClosed if self.driver.closed else UpstreamReset)(message)

    def abort(self) -> None:
        """Give up on the exchange (its client went away): the stream is reset (CANCEL) and whatever waits on
        it ends at once; the connection carries on with its other streams."""
        if self.stream is not None:
            self.driver.cancel(self.stream)

    def finish(self) -> None:
        """The exchange is over for us: a stream still open either way is reset (CANCEL); the connection
        carries on with its other streams."""
        stream = self.stream
        if stream is None:
            return
        driver = self.driver
        if not driver.closed and stream.reset_code is None:
            state = driver.h2.streams.get(stream.id)
            if state is not None and not state.closed:
                driver.reset(stream, ErrorCodes.CANCEL)
        driver.forget(stream)
