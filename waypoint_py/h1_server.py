"""HTTP/1.1 from the client inside one tunnel: keep-alive, pipelining, chunked bodies, 100-continue.

h11 keeps the protocol rules. Requests are handled one after another (pipelined ones wait in h11's buffer
until the previous response is complete), each by the forwarder, which streams the bodies both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11

from waypoint_py.errors import DownstreamGone, DownstreamProtocolError
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first
from waypoint_py.streams import READ_SIZE, write_parts

log = logging.getLogger("waypoint.http1")

MAX_HEAD_BYTES = 64 * 1024
# After a response, an unread request body up to this size is read and dropped so the connection can be
# kept; a bigger one closes the connection instead.
DISCARD_LIMIT = 256 * 1024
# A keep-alive connection with no request for this long is closed (Envoy's default idle timeout).
IDLE_TIMEOUT = 3600.0

RequestHandler = Callable[["Http1Exchange"], Awaitable[None]]
BadRequestHook = Callable[[int, str], None]


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
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        if initial:
            self.conn.receive_data(initial)
        self.draining = False
        self.idle = True

    async def run(self) -> None:
        try:
            while True:
                self.idle = True
                if self.draining:
                    return
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        event = await self.next_event()
                except TimeoutError:
                    log.debug("closing a keep-alive connection idle for %gs", IDLE_TIMEOUT)
                    return
                except h11.RemoteProtocolError as exc:
                    await self._bad_request(exc)
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed: the client is done
                self.idle = False
                exchange = Http1Exchange(self, event)
                await self.handle(exchange)
                if not await self._ready_for_next(exchange):
                    return
        except (ConnectionError, OSError, DownstreamGone):
            return
        finally:
            self.close()

    def drain(self) -> None:
        """Finish the request in flight (its response says `connection: close`), then close."""
        self.draining = True
        if self.idle:
            self.close()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.reader.read(READ_SIZE)
            self.conn.receive_data(data)  # b"" tells h11 the client closed

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
        if exchange.aborted or conn.our_state is not h11.DONE:
            return False
        if conn.their_state is h11.SEND_BODY:
            if exchange.skipped_continue:
                return False  # the client waits for a 100 that will not come; it may never send the body
            discarded = 0
            while discarded <= DISCARD_LIMIT:
                try:
                    event = await self.next_event()
                except h11.RemoteProtocolError:
                    return False
                if isinstance(event, h11.Data):
                    discarded += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return False
            else:
                return False
        if self.draining or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True

    async def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint or 400
        text = f"malformed HTTP/1.1 request: {exc}\n".encode()
        log.info("answering %d to a malformed HTTP/1.1 request: %s", status, exc)
        # h11 is in its ERROR state now and sends nothing more, so the answer is written by hand.
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
        headers: Headers = list(request.headers)
        length = first(headers, b"content-length")
        has_body = first(headers, b"transfer-encoding") is not None or (length is not None and length != b"0")
        target = request.target.decode("latin-1")
        authority = (first(headers, b"host") or b"").decode("latin-1")
        if target.startswith(("http://", "https://")):
            # Absolute form (RFC 9112 §3.2.2): its authority wins over Host, and routes see only the path.
            rest = target.split("://", 1)[1]
            authority, _, path = rest.partition("/")
            target = "/" + path
        self.head = RequestHead(
            method=request.method.decode("ascii"),
            path=target,
            authority=authority,
            headers=end_to_end(headers),
            has_body=has_body,
        )
        self.response_started = False
        self.aborted = False
        self.body_done = False
        self.skipped_continue = False  # answered while the client still waited for 100 Continue
        self._trailers: Headers | None = None

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def read_body(self) -> bytes | None:
        if self.body_done:
            return None
        conn = self.session.conn
        if conn.they_are_waiting_for_100_continue and conn.our_state is h11.SEND_RESPONSE:
            # We ask for the body only once the upstream is connected, which is what the client waits for.
            self.session.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            event = await self.session.next_event()
        except h11.RemoteProtocolError as exc:
            self.aborted = True
            raise DownstreamProtocolError(f"malformed request body: {exc}") from exc
        except (ConnectionError, OSError) as exc:
            self.aborted = True
            raise DownstreamGone(f"client connection lost: {exc}") from exc
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            self._trailers = list(event.headers) or None
            return None
        self.aborted = True
        raise DownstreamGone("client closed the connection in the middle of the request body")

    async def start_response(self, head: ResponseHead) -> None:
        self.skipped_continue = self.session.conn.they_are_waiting_for_100_continue
        headers = list(head.headers)
        if self.session.draining:
            headers.append((b"connection", b"close"))
        self._send(h11.Response(status_code=head.status, headers=headers, reason=reason(head.status)))
        self.response_started = True
        await self.session.flush()

    async def send_body(self, data: bytes) -> None:
        self._send(h11.Data(data=data))
        await self.session.flush()

    async def end_response(self, trailers: Headers | None = None) -> None:
        # HTTP/1.1 trailers need a chunked response; rather than risk h11 refusing them, they are dropped.
        self._send(h11.EndOfMessage())
        await self.session.flush()

    async def send_error(self, status: int, message: str) -> None:
        body = (message.rstrip("\n") + "\n").encode()
        head = ResponseHead(status, [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())])
        await self.start_response(head)
        if self.head.method != "HEAD":
            await self.send_body(body)
        await self.end_response()

    def abort(self) -> None:
        self.aborted = True
        self.session.close()

    def _send(self, event: h11.Event) -> None:
        try:
            self.session.write(self.session.conn.send_with_data_passthrough(event))
        except h11.LocalProtocolError as exc:
            self.abort()
            raise DownstreamGone(f"cannot send this response over HTTP/1.1: {exc}") from exc
