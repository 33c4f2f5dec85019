"""An asyncio driver for one `h2` connection over asyncio streams, as server (downstream) or client
(upstream).

`h2` owns the protocol rules; this adapter owns the read loop, the waits for flow-control window, and
back-pressure. Received DATA is acknowledged only when the consumer takes it, so a reader that is slower
than its peer holds the peer to its window instead of making us buffer.

As a server it also bounds what a client can make us spend, as the HBONE layer does for its peers
(hbone/connection.py, whose figures are reused): the windows bound what it makes us hold; answers it asks for
and does not read end the connection past MAX_QUEUED_CONTROL_FRAMES; no more than MAX_CONCURRENT_STREAMS
handlers run at once, reset streams included; and streams it resets before their answer are counted (HTTP/2
"rapid reset", CVE-2023-44487). Past a limit the connection ends with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from hbone.connection import (
    CANCELLED_STREAMS_BURST,
    CANCELLED_STREAMS_PER_SECOND,
    GOAWAY_GRACE,
    MAX_QUEUED_CONTROL_FRAMES,
    ResetBudget,
)
from hbone.errors import code_name
from hbone.h2fast import FastFrameBuffer, PlainEncoder, install_outbox
from waypoint_py.http_types import Headers
from waypoint_py.streams import READ_SIZE

log = logging.getLogger("waypoint.h2")

KiB = 1024
MiB = 1024 * KiB
# As a server, the connection window is what one client connection can make us hold of request bodies its
# handlers have not taken yet: Envoy's per_connection_buffer_limit_bytes (1 MiB). It is per tunnel (each
# HBONE stream carries an HTTP/2 connection of its own), so an HBONE connection with its 200 streams stays
# near 200 MiB rather than 200 times 16 MiB. A stream gets a quarter: a gRPC stream still moves hundreds of
# MB/s at a millisecond's round trip, and three streams stalled behind a slow upstream leave the others room.
DOWNSTREAM_STREAM_WINDOW = 256 * KiB
DOWNSTREAM_CONNECTION_WINDOW = 1 * MiB
# As a client, one connection to an endpoint carries the requests of many clients at once: its connection
# window is wider than a stream's many times over, so a few clients that read slowly do not stall the rest.
UPSTREAM_STREAM_WINDOW = 1 * MiB
UPSTREAM_CONNECTION_WINDOW = 16 * MiB
# Also the most handlers that run at once: h2 forgets a stream the client reset, while its handler may still
# be routing, dialling and sending it upstream; a new stream past that waits for a handler to finish.
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST = 64 * 1024


class StreamGone(Exception):
    """The stream was reset, or the connection carrying it ended."""


class H2Stream:
    """One request/response exchange on an `H2Driver`."""

    def __init__(self, driver: H2Driver, stream_id: int, headers: Headers, *, ended: bool = False) -> None:
        self.driver = driver
        self.id = stream_id
        self.headers = headers  # the request's
        self.ended_with_headers = ended  # the request had no body (END_STREAM on its HEADERS)
        self.answered = False  # a final response head went to h2 (server side)
        self.started = False  # handed to the driver's `on_stream` (server side)
        self.response: asyncio.Future[Headers] = driver.loop.create_future()  # client side
        self.trailers: Headers | None = None
        self.remote_ended = False
        self.reset_code: int | None = None
        # Server side: told once when the client resets the stream (or the connection fails under it), so
        # that the request it made upstream is cancelled too.
        self.on_reset: Callable[[], None] | None = None
        self._inbox: deque[tuple[bytes, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, code: int) -> None:
        self.reset_code = code
        if not self.response.done():
            self.response.set_exception(StreamGone(f"stream reset ({code_name(code)}) before the response"))
            self.response.exception()  # retrieved: whoever waits sees it; nobody waiting is fine too
        self._wake()
        callback, self.on_reset = self.on_reset, None
        if callback is not None:
            callback()

    async def read(self) -> bytes | None:
        """The next DATA payload, or None after END_STREAM. Raises StreamGone after a reset."""
        while True:
            if self._inbox:
                data, flow = self._inbox.popleft()
                self.driver._ack(self.id, flow)
                if data:
                    return data
                continue
            if self.reset_code is not None:
                raise StreamGone(f"stream reset by peer ({code_name(self.reset_code)})")
            if self.remote_ended:
                return None
            if self.driver.closed:
                raise StreamGone(f"HTTP/2 connection closed: {self.driver.close_reason}")
            self._waiter = self.driver.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def discard_unread(self) -> None:
        """Give back the window of data nobody will read."""
        while self._inbox:
            _, flow = self._inbox.popleft()
            self.driver._ack(self.id, flow)


StreamHandler = Callable[[H2Stream], None]


class H2Driver:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client: bool,
        on_stream: StreamHandler | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = reader
        self.writer = writer
        self.client = client
        self.on_stream = on_stream
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        # Header strings go out as they are: hpack's pure-Python Huffman coder is quadratic in a string's length
        # (a client's 64 KB header value cost us 0.25 s of CPU to re-encode), and HPACK allows either (point 5
        # of hbone/h2fast.py).
        self.h2.encoder = PlainEncoder()
        # h2's frame buffer keeps a frame until it is whole, even one over MAX_FRAME_SIZE (up to 16 MiB), and an
        # unfinished header block of up to 64 such frames; ours refuses the first at its header and bounds the
        # second as it grows (hbone/h2fast.py, points 3 and 7).
        buffer = FastFrameBuffer(server=not client)
        buffer.max_frame_size = self.h2.incoming_buffer.max_frame_size
        buffer.max_header_block = MAX_HEADER_LIST
        self.h2.incoming_buffer = buffer
        stream_window = UPSTREAM_STREAM_WINDOW if client else DOWNSTREAM_STREAM_WINDOW
        self._connection_window = UPSTREAM_CONNECTION_WINDOW if client else DOWNSTREAM_CONNECTION_WINDOW
        local = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if client:
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        else:
            local[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
        self.h2.local_settings = h2.settings.Settings(client=client, initial_values=local)
        self._outbox = install_outbox(self.h2)  # counts the frames other than DATA we queue (`_check_flood`)
        self.streams: dict[int, H2Stream] = {}
        self._running = 0  # streams started (`on_stream`) and not yet forgotten
        self._waiting: deque[H2Stream] = deque()  # received while MAX_CONCURRENT_STREAMS handlers ran
        self._unread_answers = 0  # frames the peer asked for since our writes to it backed up
        self._cancels_left = ResetBudget(CANCELLED_STREAMS_BURST, CANCELLED_STREAMS_PER_SECOND)
        self.closed = False
        self.close_reason = ""
        self.draining = False
        self._window_waiters: list[asyncio.Future[None]] = []
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Send our preface and SETTINGS (idempotent)."""
        if self._started:
            return
        self._started = True
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(self._connection_window - 65535)
        self._flush()

    async def run(self, initial: bytes = b"") -> None:
        """Read and dispatch until the connection ends."""
        self.start()
        try:
            if initial:
                self._receive(initial)
            while not self.closed:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    self._close("peer closed the connection")
                    break
                self._receive(data)
        except (ConnectionError, OSError) as exc:
            self._close(f"connection lost: {exc}")
        finally:
            self._close(self.close_reason or "closed")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._waiting.clear()
        for stream in list(self.streams.values()):
            if stream.remote_ended:
                stream._wake()  # what it received stays readable
            else:
                stream._fail(ErrorCodes.CANCEL)
        self._wake_senders()
        if not self.writer.is_closing():
            self.writer.close()

    def close(self, reason: str = "closed") -> None:
        self._flush()
        self._close(reason)

    def goaway(self) -> None:
        """Graceful drain (server): no new streams; those already open finish."""
        if self.draining or self.closed:
            return
        self.draining = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self._flush()
        self._write(frame.serialize())
        if not self.streams:
            self.close("drained")

    # -- receiving --------------------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        queued = self._outbox.control_frames
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("HTTP/2 protocol error from peer: %s", exc)
            self._flush()  # h2 queued a GOAWAY saying why
            self._close(f"protocol error: {exc}")
            return
        for event in events:
            self._dispatch(event)
            if self.closed:
                return
        # What this read made us queue: h2's answers (PING and SETTINGS ACKs, RST_STREAM for frames on closed
        # streams) and ours (WINDOW_UPDATE for DATA nobody takes).
        answers = self._outbox.control_frames - queued
        self._flush()
        self._check_flood(answers)

    def _check_flood(self, answers: int) -> None:
        """A peer that keeps asking for answers (PINGs, SETTINGS, frames on reset streams) and does not read
        them would grow our write buffer without bound, as nothing waits for it to drain. Once the buffer is
        over its high-water mark, the answers are counted until it is below again; past
        MAX_QUEUED_CONTROL_FRAMES (HBONE's figure) the connection ends. The count is checked after each read,
        so it may pass the bound by one read's worth (READ_SIZE: some 15,000 PINGs, 256 KiB of answers). A
        peer that reads never gets there: its answers leave as fast as it takes them."""
        transport = self.writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            self._unread_answers = 0
            return
        self._unread_answers += answers
        if self._unread_answers > MAX_QUEUED_CONTROL_FRAMES:
            log.warning("HTTP/2 peer %s does not read: %d frames queued for it; closing (ENHANCE_YOUR_CALM)",
                        self.peer_name, self._unread_answers)  # fmt: skip
            self._calm_down(f"peer does not read what it asks for ({self._unread_answers} frames queued)")

    def _count_cancelled(self, stream: H2Stream, code: int) -> bool:
        """A stream the client reset before its answer: counted (CANCELLED_STREAMS_BURST, as on HBONE); False
        once the client has done it too often and the connection is ended."""
        if self._cancels_left.take(self.loop.time()):
            return True
        log.warning("HTTP/2 peer %s: too many streams reset by it before their response (last: stream %d, %s); "
                    "closing (ENHANCE_YOUR_CALM)", self.peer_name, stream.id, code_name(code))  # fmt: skip
        self._calm_down("too many streams reset by the client before their response")
        return False

    def _calm_down(self, reason: str) -> None:
        """End the connection for abuse: GOAWAY ENHANCE_YOUR_CALM, then the transport is cut GOAWAY_GRACE later
        (closing waits for the buffer to drain, which a peer that does not read never lets happen)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        transport = self.writer.transport
        self.close(f"{reason}: ENHANCE_YOUR_CALM")
        self.loop.call_later(GOAWAY_GRACE, transport.abort)

    @property
    def peer_name(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "?")

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.reset_code is not None:
                self._ack(event.stream_id, event.flow_controlled_length)
            else:
                stream._inbox.append((event.data, event.flow_controlled_length))
                stream._wake()
                self._credit_if_window_low()
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.response.done():
                stream.response.set_result(list(event.headers or []))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers or [])  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_ended = True
                if not stream.response.done() and self.client:
                    stream._fail(ErrorCodes.PROTOCOL_ERROR)
                stream._wake()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if not self.client and not stream.answered and not self._count_cancelled(stream, event.error_code):
                    return
                stream._fail(event.error_code)
                if not self.client and not stream.started:
                    self._waiting.remove(stream)  # never started: nothing more to do for it
                    self.forget(stream)
            self._wake_senders()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_senders()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close(f"peer sent GOAWAY ({code_name(event.error_code)})"
                        if event.error_code else "peer closed the connection")  # fmt: skip

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.client or self.on_stream is None or self.draining:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, sid, list(event.headers or []), ended=event.stream_ended is not None)  # type: ignore[arg-type]
        self.streams[sid] = stream
        if self._running < MAX_CONCURRENT_STREAMS:
            self._start(stream)
        else:
            # Its DATA waits in its inbox, within the windows, until `forget` frees a handler. Of the handlers
            # running then, at least one is of a stream h2 has closed (h2 holds the client to
            # MAX_CONCURRENT_STREAMS open ones, this one among them), which needs nothing more from the client.
            self._waiting.append(stream)

    def _start(self, stream: H2Stream) -> None:
        assert self.on_stream is not None
        self._running += 1
        stream.started = True
        self.on_stream(stream)

    def _ack(self, stream_id: int, flow: int) -> None:
        if flow and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(flow, stream_id)
            self._flush()

    def _credit_if_window_low(self) -> None:
        """h2 gives connection credit back once half the window has been read, or when the window is empty
        and more is read. Neither happens when streams that are not read (their handlers wait upstream) fill
        the window after others read what they got: those would wait for ever for credit h2 owes them. So
        once less than a quarter of the window is left, what h2 owes goes back at once (as on HBONE,
        `HboneConnection._held`)."""
        window = self.h2._inbound_flow_control_window_manager
        owed = window._bytes_processed  # h2's count of bytes read and not yet given back
        if owed and window.current_window_size < window.max_window_size // 4:
            window._bytes_processed = 0
            self.h2.increment_flow_control_window(owed)
            self._flush()

    # -- sending ----------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _flush(self) -> None:
        chunks = self._outbox.take()
        if chunks:
            # One write: on a tunnel each write is a DATA frame (and a TLS record) of its own.
            self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _wake_senders(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _usable(self, stream: H2Stream) -> None:
        if self.closed:
            raise StreamGone(f"HTTP/2 connection closed: {self.close_reason}")
        if stream.reset_code is not None:
            raise StreamGone(f"stream reset by peer ({code_name(stream.reset_code)})")

    def open_stream(self, headers: Headers, *, end_stream: bool) -> H2Stream:
        """Client: send a request's HEADERS on a new stream."""
        if self.closed:
            raise StreamGone(f"HTTP/2 connection closed: {self.close_reason}")
        self.start()
        sid = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, sid, headers, ended=end_stream)
        self.streams[sid] = stream
        self.send_headers(stream, headers, end_stream=end_stream)
        return stream

    def send_headers(self, stream: H2Stream, headers: Headers, *, end_stream: bool = False, flush: bool = True) -> None:
        self._usable(stream)
        try:
            self.h2.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(f"cannot send headers: {exc}") from exc
        if not stream.answered:
            stream.answered = not any(k == b":status" and v.startswith(b"1") for k, v in headers)
        if flush:
            self._flush()

    def flush(self) -> None:
        """Write whatever h2 has queued (frames sent with `flush=False`)."""
        self._flush()

    async def send_data(self, stream: H2Stream, data: bytes, *, end_stream: bool = False) -> None:
        view = memoryview(data)
        while view:
            self._usable(stream)
            try:
                room = min(self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size)
            except h2.exceptions.ProtocolError as exc:
                raise StreamGone(f"cannot send: {exc}") from exc
            if room <= 0:
                waiter = self.loop.create_future()
                self._window_waiters.append(waiter)
                await waiter
                continue
            n = min(room, len(view))
            try:
                self.h2.send_data(stream.id, view[:n].tobytes())
            except h2.exceptions.ProtocolError as exc:
                raise StreamGone(f"cannot send: {exc}") from exc
            view = view[n:]
            self._flush()
            await self.drain()
        if end_stream:
            self.end_stream(stream)

    def end_stream(self, stream: H2Stream) -> None:
        self._usable(stream)
        try:
            self.h2.end_stream(stream.id)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(f"cannot end the stream: {exc}") from exc
        self._flush()

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self._close(f"connection lost: {exc}")
            raise StreamGone(f"HTTP/2 connection lost: {exc}") from exc

    def reset(self, stream: H2Stream, code: int = ErrorCodes.CANCEL) -> None:
        if not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.id, code)
            self._flush()

    def cancel(self, stream: H2Stream) -> None:
        """Reset the stream (CANCEL) and fail, at once, whatever waits to read from or send on it."""
        if stream.reset_code is None:
            self.reset(stream, ErrorCodes.CANCEL)
            stream._fail(ErrorCodes.CANCEL)
            self._wake_senders()

    def forget(self, stream: H2Stream) -> None:
        """The exchange is over for us: return the window of unread data, start a stream that waits for a
        handler, and close a drained connection."""
        stream.discard_unread()
        if self.streams.pop(stream.id, None) is stream and stream.started:
            self._running -= 1
            while self._waiting and self._running < MAX_CONCURRENT_STREAMS and not self.closed:
                self._start(self._waiting.popleft())
        if self.draining and not self.streams:
            self.close("drained")
