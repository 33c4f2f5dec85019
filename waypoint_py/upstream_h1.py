"""HTTP/1.1 to an endpoint over one upstream stream, keep-alive: after a complete exchange the stream may
carry the next request to the same endpoint (`upstream_pool`). Balancing stays per request: the endpoint is
chosen first, then a stream to it.

The request written here was parsed and checked on the client side (`h1_server`: method, target, header
names and values), so it is serialized as it is; the response is parsed with `h1_codec` by RFC 9112's rules:
1xx skipped, no body for HEAD/204/304, Transfer-Encoding: chunked before Content-Length, else until close.
"""

from __future__ import annotations

import asyncio
import re

from waypoint_py import h1_codec
from waypoint_py.errors import UpstreamProtocolError, UpstreamReset
from waypoint_py.h1_codec import CHUNKED, LENGTH, UNTIL_CLOSE, BodyReader, Input
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first
from waypoint_py.streams import write_parts

MAX_HEAD_BYTES = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: [^\r\n]*)?")


def _bad(message: str) -> Exception:
    return UpstreamProtocolError(f"upstream sent malformed HTTP/1.1: {message}")


def _lost(message: str) -> Exception:
    return UpstreamReset(f"upstream: {message}")


def _head_too_big() -> Exception:
    return _bad("response head too big")


class Http1Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.input = Input(reader, b"", _bad, _lost)
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._head_request = False
        self._request_chunked = False
        self._request_left = 0  # Content-Length bytes still to send
        self._request_done = False
        self._keep_alive = False
        self._body: BodyReader | None = None
        self.input.received = 0

    @property
    def trailers(self) -> Headers | None:
        return self._body.trailers if self._body is not None else None

    @property
    def nothing_received(self) -> bool:
        """Not one byte of an answer came back in this exchange (what a closed keep-alive stream looks like)."""
        return self.input.received == 0

    def reusable(self) -> bool:
        """The exchange is complete both ways, nothing came after the response, neither side asked to close:
        the stream can carry another request."""
        inp = self.input
        body = self._body
        return (self._request_done and body is not None and body.done and self._keep_alive and not inp.buf
                and not inp.eof and not self.writer.is_closing() and not self.reader.at_eof())  # fmt: skip

    def next_cycle(self) -> None:
        self._reset_exchange()

    # -- the request -------------------------------------------------------------------------------------
    async def send_head(self, head: RequestHead, end: bool = False) -> None:
        """The request head; with `end` (a request without a body) the end of the request as well."""
        self._head_request = head.method == "HEAD"
        parts = [f"{head.method} {head.path} HTTP/1.1\r\nhost: {head.authority}\r\n".encode("latin-1")]
        for k, v in head.headers:
            parts.append(k + b": " + v + b"\r\n")
        length = first(head.headers, b"content-length")
        if head.has_body and length is None:
            self._request_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        elif length is not None:
            if not h1_codec.DIGITS.fullmatch(length):
                raise UpstreamReset(f"cannot send the request over HTTP/1.1: bad Content-Length {length!r}")
            self._request_left = int(length)
        parts.append(b"\r\n")
        if end:
            self._end_request(parts)
        if self.writer.is_closing():
            raise UpstreamReset("upstream stream is closed")
        await self._write([b"".join(parts)])

    async def send_body(self, data: bytes) -> None:
        if not data:
            return
        if self._request_chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"]
        else:
            if len(data) > self._request_left:
                raise UpstreamReset("cannot send the request over HTTP/1.1: too much data for its Content-Length")
            self._request_left -= len(data)
            parts = [data]
        if self.writer.is_closing():
            raise UpstreamReset("upstream stream is closed")
        await self._write(parts)

    async def end_body(self, trailers: Headers | None) -> None:
        # Request trailers are not forwarded over HTTP/1.1 (as before).
        parts: list[bytes] = []
        self._end_request(parts)
        if parts:
            await self._write(parts)

    def _end_request(self, parts: list[bytes]) -> None:
        if self._request_chunked:
            parts.append(b"0\r\n\r\n")
        elif self._request_left:
            raise UpstreamReset("cannot send the request over HTTP/1.1: too little data for its Content-Length")
        self._request_done = True

    async def _write(self, parts: list[bytes]) -> None:
        try:
            write_parts(self.writer, parts)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise UpstreamReset(f"upstream stream lost: {exc}") from exc

    # -- the response ------------------------------------------------------------------------------------
    async def response_head(self) -> ResponseHead:
        while True:
            lines = await self.input.head(MAX_HEAD_BYTES, _head_too_big)
            if lines is None:
                raise UpstreamReset("upstream closed the connection before the response")
            match = _STATUS_LINE.fullmatch(lines[0])
            if match is None:
                raise _bad(f"illegal status line {lines[0][:60]!r}")
            if match.group(1) != b"1":
                raise _bad(f"HTTP/{match.group(1).decode()}.{match.group(2).decode()} response")
            status = int(match.group(3))
            headers = h1_codec.parse_fields(lines[1:], _bad)
            if status >= 200:
                break
            if status == 101:
                raise _bad("101 Switching Protocols that nobody asked for")
            # 100 Continue and friends: we already answered the client's Expect ourselves.
        self._frame(status, match.group(2) != b"0", headers)
        return ResponseHead(status, end_to_end(headers))

    def _frame(self, status: int, keep_alive_version: bool, headers: Headers) -> None:
        self._keep_alive = keep_alive_version and b"close" not in h1_codec.comma_tokens(headers, b"connection")
        encodings = [v for k, v in headers if k == b"transfer-encoding"]
        lengths = [v for k, v in headers if k == b"content-length"]
        if lengths:
            length = h1_codec.content_length(lengths, _bad)
        if self._head_request or status in (204, 304):
            self._body = BodyReader(self.input, LENGTH, 0)
        elif encodings:
            if len(encodings) > 1 or encodings[0].lower() != b"chunked":
                raise _bad("only Transfer-Encoding: chunked is supported")
            self._body = BodyReader(self.input, CHUNKED, trailer_limit=MAX_HEAD_BYTES)
            if lengths:
                # Transfer-Encoding wins (RFC 9112 §6.3); the Content-Length must not travel on, nor the stream.
                headers[:] = [(k, v) for k, v in headers if k != b"content-length"]
                self._keep_alive = False
        elif lengths:
            self._body = BodyReader(self.input, LENGTH, length)
        else:
            self._body = BodyReader(self.input, UNTIL_CLOSE)
            self._keep_alive = False

    def body_ready(self) -> bool:
        return self._body is None or self._body.ready()

    async def read_body(self) -> bytes | None:
        assert self._body is not None
        return await self._body.read()
