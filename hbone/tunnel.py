"""One CONNECT stream as an asyncio Transport (SPEC §3.5).

A `Tunnel` looks to its protocol exactly like a TCP transport: `data_received`, `eof_received`,
`connection_lost`, `pause_writing`/`resume_writing`; and it takes `write`, `write_eof`, `pause_reading`,
`close` and `abort`. So the same relay, StreamReader or TLS layer works over a socket or over a stream.

Flow control, both ways:
- receiving: bytes handed to the protocol are acknowledged to the peer (WINDOW_UPDATE) at once; while the
  protocol has paused reading, incoming bytes wait here unacknowledged, so the peer stops when its window
  (4 MiB by default) is used up. Memory per stream stays bounded by the window, and per connection by its
  window: bytes that wait here are acknowledged only once delivered or dropped, also after the stream ended,
  so a peer cannot pile up unread data by ending streams and opening new ones. A stream the peer resets
  before its END_STREAM drops what waits (a cut-off stream the peer abandoned, RFC 9113 §6.4); after its
  END_STREAM the stream is complete and is delivered whole (SPEC §3.5).
- sending: bytes are framed only as far as the peer's windows allow; the rest waits here, and the protocol
  is told to pause writing once that backlog passes the high-water mark.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from .authority import Authority
from .errors import StreamReset, code_name

if TYPE_CHECKING:
    from .connection import HboneConnection

log = logging.getLogger("hbone.tunnel")

CLEAN_RESET_CODES = (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL)


class _Buffering(asyncio.Protocol):
    """Placeholder protocol until the user sets theirs: data stays in the tunnel's queue."""


class Tunnel(asyncio.Transport):
    high_water = 1 << 20
    low_water = 1 << 18

    def __init__(self, conn: HboneConnection, stream_id: int, request_headers: list[tuple[bytes, bytes]]):
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self.request_headers = request_headers
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.status: int | None = None
        self.target: Authority | None = None  # the parsed :authority, set by the server before dispatch
        self._protocol: asyncio.BaseProtocol = _Buffering()
        self._has_user_protocol = False
        # receive side
        self._recv: deque[tuple[bytes, int]] = deque()
        self._reading_paused = False
        self._remote_ended = False
        self._eof_delivered = False
        # send side
        self._send: deque[memoryview] = deque()
        self._send_size = 0
        self._eof_requested = False
        self._local_ended = False
        self._write_paused_signalled = False
        # lifecycle
        self._closing = False
        self._finished = False
        self._lost_delivered = False
        self._error: BaseException | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._unacked = 0  # taken by the consumer, its stream credit not yet sent (see HboneConnection._ack)

    # -- headers -------------------------------------------------------------------------------------
    def header(self, name: str) -> str | None:
        """The last value of a request header, decoded as Latin-1 (HTTP's byte-preserving choice)."""
        key = name.lower().encode()
        value = None
        for k, v in self.request_headers:
            if k == key:
                value = v
        return value.decode("latin-1") if value is not None else None

    def header_values(self, name: str, response: bool = False) -> list[bytes]:
        key = name.lower().encode()
        headers = self.response_headers if response else self.request_headers
        return [v for k, v in headers if k == key]

    @property
    def method(self) -> str | None:
        return self.header(":method")

    @property
    def authority(self) -> str | None:
        return self.header(":authority")

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    # -- server side: the answer ----------------------------------------------------------------------
    def respond(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer the CONNECT. A non-200 answer ends the stream at once, with no body."""
        self.status = status
        end = status != 200
        self._conn._send_response(self, status, headers or [], end_stream=end)
        if end:
            self._local_ended = True
            if not self._remote_ended:
                # Tell the client to stop sending (RFC 9113 §8.1); NO_ERROR reads as a clean end.
                self._conn._reset(self, ErrorCodes.NO_ERROR)
            self._finish(None)

    # -- asyncio.Transport: protocol --------------------------------------------------------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._has_user_protocol = True
        if self._recv or self._remote_ended or self._finished:
            self._conn._loop.call_soon(self._deliver)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "tunnel":
            return self
        return self._conn.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._finished

    # -- asyncio.Transport: reading ---------------------------------------------------------------------
    def is_reading(self) -> bool:
        return not self._reading_paused and not self._finished

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._recv or self._remote_ended:
                self._deliver()

    def _on_data(self, data: bytes, flow_len: int) -> None:
        """Called by the connection for each DATA frame."""
        if self._finished:
            self._conn._ack(self, flow_len)
            return
        if self._closing:
            self._conn._ack(self, flow_len)  # the user closed: read and drop
            return
        self.bytes_received += len(data)
        if self._reading_paused or self._recv or not self._has_user_protocol:
            self._recv.append((data, flow_len))
            self._conn._held()
            return
        self._conn._ack(self, flow_len)
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        self._deliver()

    def _deliver(self) -> None:
        """Hand queued data, then EOF, then connection_lost, to the protocol while it is reading."""
        if not self._has_user_protocol or self._lost_delivered:
            return
        if self._finished and self._write_paused_signalled:
            # Nothing more will be sent: a writer waiting for the buffer to drain goes on (and its writes are
            # dropped). It may be what stops the protocol from reading what waits here.
            self._write_paused_signalled = False
            self._protocol.resume_writing()  # type: ignore[attr-defined]
        if self._error is None:
            while self._recv and not self._reading_paused:
                data, flow_len = self._recv.popleft()
                self._conn._ack(self, flow_len)
                if data:
                    self._protocol.data_received(data)  # type: ignore[attr-defined]
            if self._recv:
                return
            if self._remote_ended and not self._eof_delivered and not self._closing:
                if self._reading_paused:
                    return  # EOF waits for reading, as on a socket; connection_lost waits only for the EOF
                self._eof_delivered = True
                self._protocol.eof_received()  # type: ignore[attr-defined]
            self._check_done()
        if self._finished:
            self._lost_delivered = True
            self._protocol.connection_lost(self._error)

    # -- asyncio.Transport: writing ---------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._finished or self._eof_requested or not data:
            return
        self.bytes_sent += len(data)
        if not self._send and type(data) is bytes and self._conn._send_now(self, data):
            return  # nothing queued before it and it fits the windows: sent as it is
        self._send.append(memoryview(data))
        self._send_size += len(data)
        self._conn._flush_stream(self)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: END_STREAM once everything written so far has gone out."""
        if self._eof_requested or self._finished:
            return
        self._eof_requested = True
        self._conn._flush_stream(self)

    def get_write_buffer_size(self) -> int:
        return self._send_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.low_water, self.high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 1 << 20 if low is None else 4 * low
        if low is None:
            low = high // 4
        self.high_water, self.low_water = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._send_size > self.high_water and not self._write_paused_signalled and not self._finished:
            self._write_paused_signalled = True
            try:
                self._protocol.pause_writing()
            except Exception:  # a protocol bug must not break the connection
                log.exception("pause_writing failed on stream %d", self.stream_id)

    def _maybe_resume_protocol(self) -> None:
        if self._write_paused_signalled and self._send_size <= self.low_water:
            self._write_paused_signalled = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.exception("resume_writing failed on stream %d", self.stream_id)

    # -- closing -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Send what is buffered, end our side, and drop whatever the peer still sends."""
        if self._closing or self._finished:
            self._drop_received()  # also after the end: what the protocol will not read gives its credit back
            self._closing = True
            return
        self._closing = True
        self._drop_received()
        self.write_eof()
        self._check_done()

    def abort(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream now. CANCEL is a clean end for the peer; CONNECT_ERROR mirrors a TCP RST."""
        if self._finished:
            self._drop_received()
            return
        self._closing = True  # as a socket's abort: nothing more reaches the protocol but connection_lost
        self._send.clear()
        self._send_size = 0
        self._conn._reset(self, code)
        self._drop_received()
        self._finish(None)

    def reset(self) -> None:
        """Mirror a TCP RST from the application: RST_STREAM with CONNECT_ERROR (RFC 9113 §8.5)."""
        self.abort(ErrorCodes.CONNECT_ERROR)

    # -- called by the connection ------------------------------------------------------------------------
    def _on_reset(self, code: int, why: str | None = None) -> None:
        """The stream was reset: by the peer, or by our h2 layer for what the peer sent (`why` says so)."""
        if not self._remote_ended:
            # Cut off before the peer's END_STREAM (see the module's docstring): what waits is dropped, and
            # nothing more reaches the protocol but connection_lost, at once, even while it does not read.
            self._drop_received()
            self._closing = True
        clean = code in CLEAN_RESET_CODES
        if clean:
            # NO_ERROR/CANCEL: the peer is done; what we had is an orderly end (SPEC §3.5).
            self._remote_ended = True
            self._finish(None)
        else:
            self._finish(StreamReset(why or f"stream reset by peer ({code_name(code)})", code))

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if not self._finished:
            self._finish(StreamReset(f"HBONE connection lost: {exc or 'closed'}"))

    def _local_end_sent(self) -> None:
        self._local_ended = True
        self._check_done()

    def _check_done(self) -> None:
        if self._finished or not self._local_ended:
            return
        if self._remote_ended:
            self._finish(None)
        elif self._closing:
            # We closed but the peer still talks: stop it cleanly.
            self._conn._reset(self, ErrorCodes.CANCEL)
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        """The stream is over for the connection; queued data is still delivered after a clean end (and
        acknowledged, to the connection only, as it is delivered or dropped)."""
        if self._finished:
            return
        self._finished = True
        self._error = exc
        if exc is not None:
            self._drop_received()
        self._send.clear()
        self._send_size = 0
        self._conn._stream_finished(self)
        if self._has_user_protocol:
            # Later, so that a protocol callback that caused this does not re-enter.
            self._conn._loop.call_soon(self._deliver)

    def _drop_received(self) -> None:
        """Discard what waits for the protocol, giving its flow-control credit back (to the connection only,
        once the stream is closed): it will never be delivered."""
        if self._recv:
            self._conn._ack(self, sum(flow_len for _, flow_len in self._recv))
            self._recv.clear()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def error(self) -> BaseException | None:
        return self._error

    def __repr__(self) -> str:
        return f"<Tunnel {self.stream_id} {self.authority} on {self._conn!r}>"

