"""HTTP/1.1 from the client inside one tunnel: keep-alive, pipelining, chunked bodies, 100-continue.

h11 keeps the protocol rules, with one `h11.Connection` per client connection carried from request to request
(`start_next_cycle`). Requests are handled one after another (pipelined ones wait in h11's buffer until the
previous response is complete), each by the forwarder, which streams the bodies both ways.

Stricter than h11 in two places: a request with both Content-Length and Transfer-Encoding is refused (400)
rather than read by its Transfer-Encoding (RFC 9112 §6.1 allows either; refusing leaves no room for request
smuggling), and every request head is bounded to 64 KiB, also one that arrives whole in one read (h11 bounds
only the part of an event still incomplete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11

from waypoint_py.errors import DownstreamGone, DownstreamProtocolError
from waypoint_py.h1_heads import MAX_HEAD_BYTES, scan
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end
from waypoint_py.streams import JOIN_LIMIT, READ_SIZE, watched, write_parts

log = logging.getLogger("waypoint.http1")

# After a response, an unread request body up to this size is read and dropped so the connection can be
# kept; a bigger one closes the connection instead.
DISCARD_LIMIT = 256 * 1024
# A keep-alive connection with no request for this long is closed (Envoy's default idle timeout).
IDLE_TIMEOUT = 3600.0

RequestHandler = Callable[["Http1Exchange"], Awaitable[None]]
BadRequestHook = Callable[[int, str], None]

_REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}
# Events without content are immutable in h11: one of each serves every message.
_END = h11.EndOfMessage()
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
_SEND_RESPONSE, _SEND_BODY, _DONE, _NEED_DATA = h11.SEND_RESPONSE, h11.SEND_BODY, h11.DONE, h11.NEED_DATA


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.1 request; answered with `status`, then closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        if initial:
            self.conn.receive_data(initial)
        self.draining = False
        self.idle = True
        self.idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        # The client closed its side (or the tunnel is gone). As for Envoy, which keeps no half-closed HTTP/1.1
        # connection, the request in flight is then abandoned, and so is its upstream request.
        self.client_ended = False
        self._exchange: Http1Exchange | None = None
        protocol = watched(writer)
        if protocol is not None:
            protocol.on_end = self._on_client_end

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
                self._exchange = exchange
                await self.handle(exchange)
                self._exchange = None
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

    def _on_client_end(self) -> None:
        self.client_ended = True
        if self._exchange is not None:
            self._exchange._client_gone()

    def drain(self) -> None:
        """Finish the request in flight (its response says `connection: close`), then close."""
        self.draining = True
        if self.idle:
            self.close()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def _next_request(self) -> Http1Exchange | None:
        try:
            event = await self.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc), exc.error_status_hint or 400) from exc
        if type(event) is not h11.Request:
            return None  # ConnectionClosed: the client is done
        return Http1Exchange(self, event)  # type: ignore[arg-type]

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not _NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise DownstreamGone(f"client connection lost: {exc}") from exc
            conn.receive_data(data)  # b"" tells h11 the client closed

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
        conn = self.conn
        if exchange.aborted or conn.our_state is not _DONE:
            return False  # h11 says MUST_CLOSE: HTTP/1.0, `connection: close`, a body delimited by the close
        if conn.their_state is _SEND_BODY:
            if exchange.skipped_continue:
                return False  # the client waits for a 100 that will not come; it may never send the body
            discarded = 0
            while discarded <= DISCARD_LIMIT:
                try:
                    event = await self.next_event()
                except (h11.RemoteProtocolError, DownstreamGone):
                    return False
                if type(event) is h11.Data:
                    discarded += len(event.data)  # type: ignore[union-attr]
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    return False
            else:
                return False
        if self.draining or conn.their_state is not _DONE:
            return False
        conn.start_next_cycle()
        return True

    async def _bad_request(self, exc: BadRequest) -> None:
        status = exc.status
        text = f"malformed HTTP/1.1 request: {exc}\n".encode()
        log.info("answering %d to a malformed HTTP/1.1 request: %s", status, exc)
        # h11 is in its ERROR state now (or read a request we refuse), so the answer is written by hand.
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

    def __init__(self, session: Http1Session, request: h11.Request) -> None:
        self.session = session
        self.conn = session.conn
        # One pass over h11's header list: the size of the head, framing and Host (h11 has checked that there
        # is one Host on HTTP/1.1, at most one Transfer-Encoding, chunked, and Content-Lengths that agree).
        headers: Headers = list(request.headers)
        target = request.target
        lines, length, encoding, host = scan(headers)
        # request line: two spaces, "HTTP/1.1", CRLF
        if len(request.method) + len(target) + 12 + lines > MAX_HEAD_BYTES:
            raise BadRequest("request head too large", 431)
        if encoding is not None and length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        path = target.decode("latin-1")
        authority = host.decode("latin-1") if host is not None else ""
        if path.startswith(("http://", "https://")):
            # Absolute form (RFC 9112 §3.2.2): its authority wins over Host, and routes see only the path.
            rest = path.split("://", 1)[1]
            authority, _, path = rest.partition("/")
            path = "/" + path
        self.head = RequestHead(
            method=request.method.decode("ascii"),
            path=path,
            authority=authority,
            headers=end_to_end(headers),
            has_body=encoding is not None or (length is not None and length != b"0"),
        )
        self.response_started = False
        self.response_ended = False
        self.aborted = False
        self.body_done = False
        self._no_body = request.method == b"HEAD"  # a response to HEAD has none, whatever comes our way
        self.skipped_continue = False  # answered while the client still waited for 100 Continue
        self._on_gone: Callable[[], None] | None = None
        self._trailers: Headers | None = None
        self._held: list[bytes] = []  # response bytes not written yet (see `start_response`)
        self._held_bytes = 0

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    @property
    def gone(self) -> bool:
        return self.session.client_ended

    def watch_gone(self, callback: Callable[[], None] | None) -> None:
        self._on_gone = callback
        if self.session.client_ended:
            self._client_gone()

    def _client_gone(self) -> None:
        callback, self._on_gone = self._on_gone, None
        if callback is not None:
            callback()

    async def read_body(self) -> bytes | None:
        if self.body_done:
            return None
        conn = self.conn
        if conn.they_are_waiting_for_100_continue and conn.our_state is _SEND_RESPONSE:
            # We ask for the body only once the upstream is connected, which is what the client waits for.
            self.session.write(conn.send(_CONTINUE))
        try:
            event = await self.session.next_event()
        except h11.RemoteProtocolError as exc:
            self.aborted = True
            raise DownstreamProtocolError(f"malformed request body: {exc}") from exc
        except DownstreamGone as exc:
            self.aborted = True
            raise DownstreamGone(f"client closed the connection in the middle of the request body ({exc})") from exc
        kind = type(event)
        if kind is h11.Data:
            return bytes(event.data)  # type: ignore[union-attr]
        if kind is h11.EndOfMessage:
            self.body_done = True
            trailers = event.headers  # type: ignore[union-attr]
            self._trailers = list(trailers) if trailers else None
            return None
        self.aborted = True
        raise DownstreamGone("client closed the connection in the middle of the request body")

    # With `hold`, response bytes wait (up to JOIN_LIMIT) to go out with what follows, so that a small
    # response is one write: one DATA frame and one TLS record instead of one each for head, body and end.
    # The forwarder holds only what it can follow up at once, and calls `flush` before it waits.
    async def start_response(self, head: ResponseHead, hold: bool = False) -> None:
        conn = self.conn
        self.skipped_continue = conn.they_are_waiting_for_100_continue
        headers = head.headers
        if self.session.draining or self.aborted:
            # No other request follows on this connection: draining, or this request was not read whole.
            headers = [*headers, (b"connection", b"close")]
        # h11 frames it: chunked when the length is unknown (or delimited by the close for HTTP/1.0), no body
        # for HEAD, and `connection: close` whenever the connection will not carry another request.
        status = head.status
        response = h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
        self._send(conn.send, response)
        self.response_started = True
        if not hold:
            await self.flush()

    async def send_body(self, data: bytes, hold: bool = False) -> None:
        if data and not self._no_body:
            self._send(self.conn.send_with_data_passthrough, h11.Data(data=data))
        if not hold or self._held_bytes > JOIN_LIMIT:
            await self.flush()

    async def end_response(self, trailers: Headers | None = None) -> None:
        # HTTP/1.1 trailers need a chunked response; rather than risk h11 refusing them, they are dropped.
        self._send(self.conn.send, _END)
        self.response_ended = True
        await self.flush()

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

    def _send(self, send: Callable[[h11.Event], object], event: h11.Event) -> None:
        try:
            data = send(event)
        except h11.LocalProtocolError as exc:
            self.abort()
            raise DownstreamGone(f"cannot send this response over HTTP/1.1: {exc}") from exc
        if type(data) is list:
            self._held.extend(data)
            self._held_bytes += sum(map(len, data))
        elif data:
            self._held.append(data)  # type: ignore[arg-type]
            self._held_bytes += len(data)  # type: ignore[arg-type]
