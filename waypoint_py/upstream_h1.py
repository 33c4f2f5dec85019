"""HTTP/1.1 to an endpoint over one upstream stream, keep-alive: after a complete exchange the stream may
carry the next request to the same endpoint (`upstream_pool`). Balancing stays per request: the endpoint is
chosen first, then a stream to it.

h11 keeps the protocol rules, with one `h11.Connection` per upstream stream carried from exchange to exchange
(`start_next_cycle`): 1xx skipped, no body for HEAD/204/304, Transfer-Encoding: chunked before
Content-Length, else until the close. A response framed by both Transfer-Encoding and Content-Length is read
by its chunks, loses its Content-Length and does not leave its stream fit for another request.
"""

from __future__ import annotations

import asyncio

import h11

from waypoint_py.errors import UpstreamClosed, UpstreamProtocolError, UpstreamReset
from waypoint_py.h1_heads import MAX_HEAD_BYTES, scan
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first
from waypoint_py.streams import READ_SIZE, write_parts

_END = h11.EndOfMessage()  # immutable: one serves every request
_DONE, _NEED_DATA, _PAUSED = h11.DONE, h11.NEED_DATA, h11.PAUSED


class Http1Upstream:
    __slots__ = ("_eof", "_keep", "_peeked", "_received", "_trailers", "conn", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._received = 0  # bytes read from the upstream in this exchange
        self._eof = False
        self._keep = True  # False: the stream must not carry another request, whatever h11 says
        self._peeked: h11.Event | h11.RemoteProtocolError | None = None  # taken ahead by `body_ready`
        self._trailers: Headers | None = None

    @property
    def trailers(self) -> Headers | None:
        return self._trailers

    @property
    def nothing_received(self) -> bool:
        """Not one byte of an answer came back in this exchange (what a closed keep-alive stream looks like)."""
        return self._received == 0

    def reusable(self) -> bool:
        """The exchange is complete both ways, nothing came after the response, neither side asked to close:
        the stream can carry another request."""
        conn = self.conn
        if not self._keep or conn.our_state is not _DONE or conn.their_state is not _DONE:
            return False
        if self.writer.is_closing() or self.reader.at_eof():
            return False
        trailing, closed = conn.trailing_data
        return not trailing and not closed

    def abort(self) -> None:
        """Give up on the exchange (its client went away): the stream closes, never to be reused, and whatever
        waits for the upstream ends at once."""
        self._keep = False
        self.reader.set_exception(ConnectionAbortedError("the request was cancelled"))
        self.writer.close()

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self._received = 0
        self._peeked = None
        self._trailers = None

    # -- the request -------------------------------------------------------------------------------------
    async def send_head(self, head: RequestHead, end: bool = False) -> None:
        """The request head; with `end` (a request without a body) the end of the request as well."""
        headers: Headers = [(b"host", head.authority.encode("latin-1")), *head.headers]
        if head.has_body and first(head.headers, b"content-length") is None:
            headers.append((b"transfer-encoding", b"chunked"))
        conn = self.conn
        try:
            request = h11.Request(method=head.method.encode("ascii"), target=head.path.encode("latin-1"),
                                  headers=headers)  # fmt: skip
            data = conn.send(request)
            if end:
                data += conn.send(_END)
        except h11.LocalProtocolError as exc:
            raise UpstreamReset(f"cannot send the request over HTTP/1.1: {exc}") from exc
        await self._write([data])

    async def send_body(self, data: bytes) -> None:
        if not data:
            return
        try:
            parts = self.conn.send_with_data_passthrough(h11.Data(data=data))
        except h11.LocalProtocolError as exc:
            raise UpstreamReset(f"cannot send the request over HTTP/1.1: {exc}") from exc
        await self._write(parts)  # type: ignore[arg-type]

    async def end_body(self, trailers: Headers | None) -> None:
        # Request trailers are not forwarded over HTTP/1.1.
        try:
            data = self.conn.send(_END)
        except h11.LocalProtocolError as exc:
            raise UpstreamReset(f"cannot send the request over HTTP/1.1: {exc}") from exc
        if data:
            await self._write([data])

    async def _write(self, parts: list[bytes]) -> None:
        writer = self.writer
        if writer.is_closing():
            raise UpstreamClosed("upstream stream is closed")
        try:
            write_parts(writer, parts)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            raise UpstreamClosed(f"upstream stream lost: {exc}") from exc

    # -- the response ------------------------------------------------------------------------------------
    async def response_head(self) -> ResponseHead:
        while True:
            event = await self._next_event()
            kind = type(event)
            if kind is h11.Response:
                break
            if kind is not h11.InformationalResponse:
                raise UpstreamClosed(f"upstream closed the connection before the response ({kind.__name__})")
            # 100 Continue and friends: we already answered the client's Expect ourselves.
        headers: Headers = list(event.headers)  # type: ignore[union-attr]
        lines, length, encoding, _ = scan(headers)
        if len(event.reason) + 15 + lines > MAX_HEAD_BYTES:  # type: ignore[union-attr]  # + the status line
            raise UpstreamProtocolError("upstream sent malformed HTTP/1.1: response head too big")
        if encoding is not None and length is not None:
            # Transfer-Encoding wins (RFC 9112 §6.3); the Content-Length must not travel on, nor the stream.
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            self._keep = False
        return ResponseHead(event.status_code, end_to_end(headers))  # type: ignore[union-attr]

    def body_ready(self) -> bool:
        """`read_body` would answer without waiting for the upstream (h11 has the next event buffered)."""
        if self._peeked is not None:
            return True
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._peeked = exc
            return True
        if event is _NEED_DATA:
            return False
        self._peeked = event  # type: ignore[assignment]
        return True

    async def read_body(self) -> bytes | None:
        event = await self._next_event()
        kind = type(event)
        if kind is h11.Data:
            return bytes(event.data)  # type: ignore[union-attr]
        if kind is h11.EndOfMessage:
            trailers = event.headers  # type: ignore[union-attr]
            self._trailers = list(trailers) if trailers else None
            return None
        raise UpstreamClosed("upstream closed the connection in the middle of the response body")

    async def _next_event(self) -> h11.Event:
        conn = self.conn
        peeked, self._peeked = self._peeked, None
        # Nothing read yet in this exchange: h11's buffer is empty (a kept stream had nothing after its last
        # response), so it could only answer NEED_DATA.
        unread = self._received == 0 and not self._eof
        while True:
            try:
                if unread:
                    event, unread = _NEED_DATA, False
                elif peeked is None:
                    event = conn.next_event()
                elif isinstance(peeked, h11.RemoteProtocolError):
                    raise peeked
                else:
                    event, peeked = peeked, None
            except h11.RemoteProtocolError as exc:
                if self._eof:
                    raise UpstreamClosed(f"upstream closed the connection in the middle of a message ({exc})") from exc
                raise UpstreamProtocolError(f"upstream sent malformed HTTP/1.1: {exc}") from exc
            if event is _NEED_DATA:
                try:
                    data = await self.reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    raise UpstreamClosed(f"upstream stream lost: {exc}") from exc
                if data:
                    self._received += len(data)
                else:
                    self._eof = True
                conn.receive_data(data)  # b"": the upstream ended the stream
                continue
            if event is _PAUSED:
                raise UpstreamProtocolError("upstream sent more than one response")
            return event  # type: ignore[return-value]
