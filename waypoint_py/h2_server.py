"""HTTP/2 with prior knowledge from the client inside one tunnel (gRPC among others).

Each stream is handled in its own task by the forwarder, so a slow request never holds up the others on
the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from h2.errors import ErrorCodes

from waypoint_py.errors import DownstreamGone
from waypoint_py.h2_driver import H2Driver, H2Stream, StreamGone
from waypoint_py.http_types import Headers, RequestHead, ResponseHead, end_to_end, first

log = logging.getLogger("waypoint.http2")

RequestHandler = Callable[["Http2Exchange"], Awaitable[None]]


class Http2Session:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes, handle: RequestHandler
    ) -> None:
        self.handle = handle
        self.initial = initial
        self.driver = H2Driver(reader, writer, client=False, on_stream=self._on_stream)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            await self.driver.run(self.initial)
        finally:
            # The client connection is gone: requests still waiting on their upstream are abandoned.
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def drain(self) -> None:
        self.driver.goaway()

    def _on_stream(self, stream: H2Stream) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: H2Stream) -> None:
        exchange = Http2Exchange(self.driver, stream)
        try:
            await self.handle(exchange)
        except Exception:
            log.exception("request handler failed on stream %d", stream.id)
            exchange.abort()
        finally:
            if not exchange.response_ended and not exchange.aborted:
                exchange.abort()
            elif exchange.response_ended and not stream.remote_ended and stream.reset_code is None:
                # Answered before the request body ended: tell the client to stop sending (RFC 9113 §8.1).
                self.driver.reset(stream, ErrorCodes.NO_ERROR)
            self.driver.forget(stream)


class Http2Exchange:
    """One stream of an `Http2Session`; the `Downstream` the forwarder works with."""

    protocol = "HTTP/2"

    def __init__(self, driver: H2Driver, stream: H2Stream) -> None:
        self.driver = driver
        self.stream = stream
        pseudo = {k: v for k, v in stream.headers if k.startswith(b":")}
        authority = pseudo.get(b":authority") or first(stream.headers, b"host") or b""
        self.head = RequestHead(
            method=pseudo.get(b":method", b"GET").decode("ascii"),
            path=pseudo.get(b":path", b"/").decode("latin-1"),
            authority=authority.decode("latin-1"),
            headers=end_to_end(stream.headers, keep_te_trailers=True),
            has_body=not stream.ended_with_headers,
            scheme=pseudo.get(b":scheme", b"http").decode("ascii"),
        )
        self.response_started = False
        self.response_ended = False
        self.aborted = False
        self._held: Headers | None = None  # a response head not given to h2 yet (see `start_response`)
        # `expect` is not forwarded: the 100 is ours to send, once the upstream is connected and the body is
        # asked for (as h1_server does for HTTP/1.1).
        expect = first(stream.headers, b"expect")
        self._continue = self.head.has_body and expect is not None and expect.lower() == b"100-continue"

    @property
    def request_trailers(self) -> Headers | None:
        return self.stream.trailers

    async def read_body(self) -> bytes | None:
        if self._continue:
            self._continue = False
            if not self.response_started:
                self._call(self.driver.send_headers, self.stream, [(b":status", b"100")])
        try:
            return await self.stream.read()
        except StreamGone as exc:
            raise DownstreamGone(f"client stream ended: {exc}") from exc

    async def start_response(self, head: ResponseHead, hold: bool = False) -> None:
        headers = [(b":status", str(head.status).encode()), *end_to_end(head.headers)]
        if hold:
            # Held back: the HEADERS frame goes out with the first DATA, at `flush`, or, for a response that
            # ends with its head (gRPC's trailers-only answer), carrying END_STREAM itself.
            self._held = headers
        else:
            self._call(self.driver.send_headers, self.stream, headers)
        self.response_started = True

    def _send_held(self, *, end_stream: bool = False) -> None:
        if self._held is not None:
            headers, self._held = self._held, None
            self._call(self.driver.send_headers, self.stream, headers, end_stream=end_stream, flush=False)

    async def send_body(self, data: bytes, hold: bool = False) -> None:
        self._send_held()
        try:
            await self.driver.send_data(self.stream, data)
        except StreamGone as exc:
            raise DownstreamGone(f"client stream ended: {exc}") from exc

    async def flush(self) -> None:
        self._send_held()
        self.driver.flush()
        try:
            await self.driver.drain()
        except StreamGone as exc:
            raise DownstreamGone(f"client stream ended: {exc}") from exc

    async def end_response(self, trailers: Headers | None = None) -> None:
        if trailers:
            self._send_held()
            self._call(self.driver.send_headers, self.stream, end_to_end(trailers), end_stream=True)
        elif self._held is not None:
            self._send_held(end_stream=True)  # no body, no trailers: one HEADERS frame with END_STREAM
            self.driver.flush()
        else:
            self._call(self.driver.end_stream, self.stream)
        self.response_ended = True
        with contextlib.suppress(StreamGone):
            await self.driver.drain()

    async def send_error(self, status: int, message: str) -> None:
        body = (message.rstrip("\n") + "\n").encode()
        await self.start_response(
            ResponseHead(status, [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())])
        )
        await self.send_body(body)
        await self.end_response()

    @property
    def gone(self) -> bool:
        return self.stream.reset_code is not None

    def watch_gone(self, callback: Callable[[], None] | None) -> None:
        self.stream.on_reset = callback
        if callback is not None and self.gone:
            self.stream.on_reset = None
            callback()

    def abort(self) -> None:
        self._held = None
        if not self.aborted:
            self.aborted = True
            self.driver.reset(self.stream, ErrorCodes.CANCEL if self.response_started else ErrorCodes.INTERNAL_ERROR)

    def _call(self, fn: Callable[..., None], *args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)
        except StreamGone as exc:
            raise DownstreamGone(f"client stream ended: {exc}") from exc
