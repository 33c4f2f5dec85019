"""HTTP/1.1 from the client inside one tunnel: keep-alive, pipelining, chunked bodies, 100-continue.

Requests are handled one after another (pipelined ones wait in the input buffer until the previous response
is complete), each by the forwarder, which streams the bodies both ways. The protocol rules are h11's, which
this module replaced on the per-request path (`h1_codec` parses, responses are framed here): the same request
grammar and bounds (64 KiB heads, one Host on HTTP/1.1, Content-Length and chunked only), HTTP/1.0 clients
never kept alive, responses of unknown length chunked for HTTP/1.1 and delimited by close for HTTP/1.0,
`Connection: close` whenever the connection will not carry another request. One difference: a request with
both Content-Length and Transfer-Encoding is refused (400) rather than read by its Transfer-Encoding (RFC 9112
§6.1 allows either; refusing leaves no room for request smuggling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from waypoint_py import h1_codec
from waypoint_py.errors import DownstreamGone, DownstreamProtocolError
from waypoint_py.h1_codec import CHUNKED, LENGTH, BodyReader, Input
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first
from waypoint_py.streams import JOIN_LIMIT, write_parts

log = logging.getLogger("waypoint.http1")

MAX_HEAD_BYTES = 64 * 1024
# After a response, an unread request body up to this size is read and dropped so the connection can be
# kept; a bigger one closes the connection instead.
DISCARD_LIMIT = 256 * 1024
# A keep-alive connection with no request for this long is closed (Envoy's default idle timeout).
IDLE_TIMEOUT = 3600.0

RequestHandler = Callable[["Http1Exchange"], Awaitable[None]]
BadRequestHook = Callable[[int, str], None]

_REQUEST_LINE = re.compile(rb"(" + h1_codec.TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.1 request; answered with `status`, then closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _bad(message: str) -> Exception:
    return BadRequest(message)


def _lost(message: str) -> Exception:
    return DownstreamGone(message)


def _head_too_big() -> Exception:
    return BadRequest("request head too large", 431)


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class Http1Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes,
        handle: RequestHandler,
        on_bad_request: BadRequestHook,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handle = handle
        self.on_bad_request = on_bad_request
        self.input = Input(reader, initial, _bad, _lost)
        self.draining = False
        self.idle = True
        self.idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # One timer for the whole session rather than a timeout around every wait for a request: it wakes
        # up once per IDLE_TIMEOUT and closes the connection if it has been idle that long.
        self._idle_timer = loop.call_later(IDLE_TIMEOUT, self._check_idle)
        try:
            while True:
                self.idle = True
                self.idle_since = loop.time()
                if self.draining:
                    return
                try:
                    exchange = await self._next_request()
                except BadRequest as exc:
                    await self._bad_request(exc)
                    return
                if exchange is None:
                    return  # the client is done (or was idle for too long, see _check_idle)
                self.idle = False
                await self.handle(exchange)
                if not await self._ready_for_next(exchange):
                    return
        except (ConnectionError, OSError, DownstreamGone):
            return
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self.close()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self.idle_since
        if self.idle and idle_for >= IDLE_TIMEOUT:
            log.debug("closing a keep-alive connection idle for %gs", IDLE_TIMEOUT)
            self.close()  # the wait for the next request then ends as if the client had closed
            return
        wait = IDLE_TIMEOUT - idle_for if self.idle else IDLE_TIMEOUT
        self._idle_timer = loop.call_later(max(wait, 0.001), self._check_idle)

    def drain(self) -> None:
        """Finish the request in flight (its response says `connection: close`), then close."""
        self.draining = True
        if self.idle:
            self.close()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def _next_request(self) -> Http1Exchange | None:
        inp = self.input
        if inp.buf[:1] and inp.buf[0] < 0x21:
            raise BadRequest("illegal request line")  # not even the start of one (TLS, binary, blank line)
        try:
            lines = await inp.head(MAX_HEAD_BYTES, _head_too_big)
        except DownstreamGone as exc:
            raise BadRequest(f"peer unexpectedly closed the connection ({exc})") from exc
        if lines is None:
            return None
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise BadRequest(f"illegal request line: {lines[0][:80]!r}")
        method, target, version = match.groups()
        headers = h1_codec.parse_fields(lines[1:], _bad)
        hosts = sum(1 for k, _ in headers if k == b"host")
        if hosts == 0 and version == b"1.1":
            raise BadRequest("Missing mandatory Host: header")
        if hosts > 1:
            raise BadRequest("Found multiple Host: headers")
        encodings = [v for k, v in headers if k == b"transfer-encoding"]
        lengths = [v for k, v in headers if k == b"content-length"]
        if encodings:
            if len(encodings) > 1:
                raise BadRequest("multiple Transfer-Encoding headers", 501)
            if encodings[0].lower() != b"chunked":
                raise BadRequest("Only Transfer-Encoding: chunked is supported", 501)
            if lengths:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            body = BodyReader(inp, CHUNKED, trailer_limit=MAX_HEAD_BYTES)
        elif lengths:
            body = BodyReader(inp, LENGTH, h1_codec.content_length(lengths, _bad))
        else:
            body = BodyReader(inp, LENGTH, 0)
        return Http1Exchange(self, method, target, version, headers, body)

    def write(self, data: bytes | list[bytes] | None) -> None:
        if not data or self.writer.is_closing():
            return
        if isinstance(data, list):
            write_parts(self.writer, data)
        else:
            self.writer.write(data)

    async def flush(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise DownstreamGone(f"client connection lost: {exc}") from exc

    async def _ready_for_next(self, exchange: Http1Exchange) -> bool:
        if exchange.aborted or not exchange.response_ended or exchange.must_close:
            return False
        body = exchange.body
        if not body.done:
            if exchange.skipped_continue:
                return False  # the client waits for a 100 that will not come; it may never send the body
            discarded = 0
            try:
                while discarded <= DISCARD_LIMIT:
                    chunk = await body.read()
                    if chunk is None:
                        break
                    discarded += len(chunk)
                else:
                    return False
            except (BadRequest, DownstreamGone):
                return False
        return not self.draining and exchange.keep_alive

    async def _bad_request(self, exc: BadRequest) -> None:
        status = exc.status
        text = f"malformed HTTP/1.1 request: {exc}\n".encode()
        log.info("answering %d to a malformed HTTP/1.1 request: %s", status, exc)
        self.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason(status), len(text), text)
        )
        self.on_bad_request(status, str(exc))
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()


class Http1Exchange:
    """One request/response on an `Http1Session`; the `Downstream` the forwarder works with."""

    protocol = "HTTP/1.1"

    def __init__(self, session: Http1Session, method: bytes, target_bytes: bytes, version: bytes, headers: Headers,
                 body: BodyReader) -> None:  # fmt: skip
        self.session = session
        self.body = body
        self.version = version
        self.method = method
        length = first(headers, b"content-length")
        has_body = first(headers, b"transfer-encoding") is not None or (length is not None and length != b"0")
        target = target_bytes.decode("latin-1")
        authority = (first(headers, b"host") or b"").decode("latin-1")
        if target.startswith(("http://", "https://")):
            # Absolute form (RFC 9112 §3.2.2): its authority wins over Host, and routes see only the path.
            rest = target.split("://", 1)[1]
            authority, _, path = rest.partition("/")
            target = "/" + path
        self.head = RequestHead(
            method=method.decode("ascii"),
            path=target,
            authority=authority,
            headers=end_to_end(headers),
            has_body=has_body,
        )
        # HTTP/1.0 clients are not kept alive (as h11), nor those that say `connection: close`.
        self.keep_alive = version >= b"1.1" and b"close" not in h1_codec.comma_tokens(headers, b"connection")
        self.must_close = False  # the response is delimited by the end of the connection
        # The client waits for 100 Continue before it sends the body, until it gets that or a response.
        expect = h1_codec.comma_tokens(headers, b"expect")
        self.waiting_for_continue = version >= b"1.1" and b"100-continue" in expect
        self.response_started = False
        self.response_ended = False
        self.aborted = False
        self.skipped_continue = False  # answered while the client still waited for 100 Continue
        self._held: list[bytes] = []  # response bytes not written yet (see `hold`)
        self._held_bytes = 0
        self._chunked = False  # response framing
        self._left: int | None = None  # response Content-Length bytes still to send; None: not by length
        self._no_body = False

    @property
    def body_done(self) -> bool:
        return self.body.done

    @property
    def request_trailers(self) -> Headers | None:
        return self.body.trailers

    async def read_body(self) -> bytes | None:
        body = self.body
        if body.done:
            return None
        if self.waiting_for_continue and not self.response_started:
            # We ask for the body only once the upstream is connected, which is what the client waits for.
            self.waiting_for_continue = False
            self.session.write(_CONTINUE)
        try:
            chunk = await body.read()
        except BadRequest as exc:
            self.aborted = True
            raise DownstreamProtocolError(f"malformed request body: {exc}") from exc
        except DownstreamGone as exc:
            self.aborted = True
            raise DownstreamGone(f"client closed the connection in the middle of the request body ({exc})") from exc
        self.waiting_for_continue = False
        return chunk

    # With `hold`, response bytes wait (up to JOIN_LIMIT) to go out with what follows, so that a small
    # response is one write: one DATA frame and one TLS record instead of one each for head, body and end.
    # The forwarder holds only what it can follow up at once, and calls `flush` before it waits.
    async def start_response(self, head: ResponseHead, hold: bool = False) -> None:
        self.skipped_continue = self.waiting_for_continue
        self.waiting_for_continue = False
        status = head.status
        headers = head.headers
        lengths = [v for k, v in headers if k == b"content-length"]
        extra: list[bytes] = []
        close = not self.keep_alive or self.session.draining
        if status in (204, 304) or (100 <= status < 200):
            self._left = 0
        elif lengths and first(headers, b"transfer-encoding") is None:
            try:
                self._left = h1_codec.content_length(lengths, _bad)
            except BadRequest as exc:
                self.abort()
                raise DownstreamGone(f"cannot send this response over HTTP/1.1: {exc}") from exc
        else:
            # Unknown length: chunked for HTTP/1.1, else delimited by the end of the connection.
            headers = [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
            if self.version >= b"1.1":
                self._chunked = True
                extra.append(b"Transfer-Encoding: chunked\r\n")
            elif self.method != b"HEAD":
                self.must_close = close = True
        if self.method == b"HEAD":
            self._no_body = True
        if close:
            self.keep_alive = False
            tokens = {t for t in h1_codec.comma_tokens(headers, b"connection") if t != b"keep-alive"}
            tokens.add(b"close")
            headers = [(k, v) for k, v in headers if k != b"connection"]
            extra.append(b"Connection: " + b", ".join(sorted(tokens)) + b"\r\n")
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        parts.extend(extra)
        parts.append(b"\r\n")
        self._hold(b"".join(parts))
        self.response_started = True
        if not hold:
            await self.flush()

    async def send_body(self, data: bytes, hold: bool = False) -> None:
        if data and not self._no_body:
            if self._chunked:
                self._hold(b"%x\r\n" % len(data))
                self._hold(data)
                self._hold(b"\r\n")
            else:
                if self._left is not None:
                    if len(data) > self._left:
                        self.abort()
                        raise DownstreamGone("cannot send this response over HTTP/1.1: too much data for its "
                                             "Content-Length")  # fmt: skip
                    self._left -= len(data)
                self._hold(data)
        if not hold or self._held_bytes > JOIN_LIMIT:
            await self.flush()

    async def end_response(self, trailers: Headers | None = None) -> None:
        # HTTP/1.1 trailers are dropped (as with h11 before: they would need care with every client).
        if self._chunked and not self._no_body:
            self._hold(b"0\r\n\r\n")
        elif self._left and not self._no_body:
            self.abort()
            raise DownstreamGone("cannot send this response over HTTP/1.1: too little data for its Content-Length")
        self.response_ended = True
        await self.flush()
        if self.must_close:
            self.session.close()

    async def flush(self) -> None:
        """Write what is held, and wait while the client's side is backed up."""
        if self._held:
            parts, self._held = self._held, []
            self._held_bytes = 0
            self.session.write(parts)
        await self.session.flush()

    async def send_error(self, status: int, message: str) -> None:
        body = (message.rstrip("\n") + "\n").encode()
        head = ResponseHead(status, [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())])
        await self.start_response(head, hold=True)
        await self.send_body(body, hold=True)
        await self.end_response()

    def abort(self) -> None:
        self.aborted = True
        self._held = []
        self.session.close()

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
