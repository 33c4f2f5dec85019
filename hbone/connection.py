"""An HBONE HTTP/2 connection (SPEC §3.2–3.5), client or server, as an asyncio Protocol.

It runs over any asyncio Transport that carries bytes in order: a TLS socket, or a TLS session inside
another tunnel (double HBONE). The `h2` state machine owns the protocol rules; this class moves bytes,
keeps timers (handshake, PING keepalive, certificate expiry, drain deadline) and maps events to `Tunnel`
streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import DataFrame, GoAwayFrame

from .errors import ConnectionClosed, ConnectRefused, H2HandshakeFailure, StreamReset, code_name
from .h2fast import DataPath, FastFrameBuffer, PreambleError, StreamRejected, install_outbox, make_connection
from .identity import Identity
from .tunnel import Tunnel

log = logging.getLogger("hbone.connection")

KiB = 1024
MiB = 1024 * KiB
HANDSHAKE_TIMED_OUT = "HTTP/2 handshake timed out"  # the close reason when no SETTINGS came in time
# Frames other than DATA (PING and SETTINGS ACKs, RST_STREAM, HEADERS...) we may queue for a peer that does not
# read while our writes to it are paused; past that it is flooding us (Go's HTTP/2 server allows as many).
MAX_QUEUED_CONTROL_FRAMES = 10_000
GOAWAY_GRACE = 1.0  # seconds a peer we end for flooding gets to read its GOAWAY before the socket is cut
# Streams we reset for what the peer sent on them (a malformed request, a stream over our concurrency limit, a
# new stream while we drain) cost the connection only that stream, so a peer could ask for them without end: an
# HPACK decode and a RST_STREAM each, the pattern of HTTP/2 "rapid reset" (CVE-2023-44487). They are counted
# in a token bucket, as nghttp2 counts received resets (burst 1000, 33 a second), and once it is empty the
# connection ends with GOAWAY ENHANCE_YOUR_CALM. A legitimate client meets a reset only by racing us: opening
# streams before our SETTINGS (its first round trip; our clients open at most 100 at once) or after our GOAWAY.
# A client with a bug that makes every request malformed gets nothing from its connection anyway. The burst
# covers any such race several times over; the refill lets a long-lived pooled connection meet one now and
# then for ever, while a flood is cut after a few hundred streams.
REJECTED_STREAMS_BURST = 300
REJECTED_STREAMS_PER_SECOND = 10.0
# The other half of "rapid reset": a valid CONNECT the peer itself resets (RST_STREAM) before we answered it. Each
# one still reached `on_stream` (in ztunnel, a task and a dial to the application) and costs the peer nothing, so
# these are counted too, in a bucket of their own with nghttp2's own figures (its stream_reset_rate_limit: burst
# 1000, 33 a second), and the connection ends with GOAWAY ENHANCE_YOUR_CALM once it is empty. A separate bucket,
# because unlike the resets above this is what well-behaved clients do: a gRPC client cancelling calls, curl or
# a source application giving up on a slow dial; with its own budget no amount of that ever eats into the budget
# for races, nor the other way round. nghttp2's figures, because nghttp2 (Envoy's HTTP/2 codec) counts every
# received reset, answered or not, where we count only those of streams not yet answered: any client that lives
# with Istio's own proxies lives with this. Once we answered, a reset is the normal end of a tunnel and is free.
CANCELLED_STREAMS_BURST = 1000
CANCELLED_STREAMS_PER_SECOND = 33.0
# A WINDOW_UPDATE goes out once this part of a window (stream or connection) has been consumed (see `_ack`).
WINDOW_UPDATE_FRACTION = 4
# The certificate-expiry timer runs on the loop's monotonic clock while notAfter is wall-clock time: it wakes at
# least this often to compare with the wall clock again (which may have been stepped, or the host suspended),
# and so is never handed the years until a distant notAfter (uvloop overflows on huge delays).
EXPIRY_RECHECK = 3600.0


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 parameters of SPEC §3.2 (Istio's ztunnel defaults)."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    frame_size: int = 1 * MiB
    server_max_streams: int = 200
    client_max_streams: int = 100
    server_max_header_list: int = 64 * KiB
    client_max_header_list: int = 16 * KiB
    ping_interval: float = 10.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0


StreamHandler = Callable[[Tunnel], None]


class ResetBudget:
    """A token bucket: `burst` resets at once at most, then `rate` more a second. Time is an argument."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, burst: int = REJECTED_STREAMS_BURST, rate: float = REJECTED_STREAMS_PER_SECOND) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """One more reset at `now` (any monotonic clock, in seconds): False once the budget is spent."""
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class HboneConnection(asyncio.Protocol):
    """One HTTP/2 connection. Servers get each CONNECT through `on_stream`; clients call `open_stream`."""

    # `data_received` copies its argument into h2's frame buffer before anything else runs, so the TLS layer
    # may hand it a view of its scratch buffer instead of a copy.
    copies_input = True

    def __init__(
        self,
        *,
        client: bool,
        settings: H2Settings | None = None,
        on_stream: StreamHandler | None = None,
        local_identity: Identity | None = None,
        peer_identity: Identity | None = None,
        name: str = "",
        close_when_idle: bool = False,
        not_after: float | None = None,
    ) -> None:
        self.client = client
        # When the earlier of the two certificates (ours, the peer's) expires, Unix time (`tls.session_not_after`).
        self._not_after = not_after
        # An unpooled connection (double HBONE's inner one) ends with its last stream.
        self.close_when_idle = close_when_idle
        self.settings = settings or H2Settings()
        self.on_stream = on_stream
        self.local_identity = local_identity
        self.peer_identity = peer_identity
        self.name = name
        self._loop = asyncio.get_running_loop()
        # A malformed header block costs its stream only (RFC 9113 §8.1.1), see `h2fast.HboneH2Connection`.
        config = h2.config.H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=True)
        self._h2 = make_connection(config, self._on_goaway_frame)
        self._receive_window = self._h2._inbound_flow_control_window_manager  # what the peer may still send us
        self._outbox = install_outbox(self._h2)
        self._data_path = DataPath(self._h2, self._outbox)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Tunnel] = {}
        self._blocked: set[Tunnel] = set()  # streams with data queued that their windows did not let go
        # Of those, the ones whose own stream window has room: what a connection WINDOW_UPDATE may unblock.
        self._blocked_on_connection: set[Tunnel] = set()
        # Flow-control credit is given back once a quarter of a window has been consumed (see `_ack`).
        self._stream_update_at = max(1, self.settings.stream_window // WINDOW_UPDATE_FRACTION)
        self._connection_update_at = max(1, self.settings.connection_window // WINDOW_UPDATE_FRACTION)
        self._connection_unacked = 0
        self._pending_open: dict[int, asyncio.Future[Tunnel]] = {}
        self._batch = False
        self._write_paused = False
        self._control_frames_at_pause = 0
        self._closed = False
        self._draining = False
        self._goaway_received = False
        self._highest_inbound = 0
        self._resets_left = ResetBudget()  # streams we reset for what the peer sent (REJECTED_STREAMS_BURST)
        # Streams the peer reset before we answered them (CANCELLED_STREAMS_BURST).
        self._cancels_left = ResetBudget(CANCELLED_STREAMS_BURST, CANCELLED_STREAMS_PER_SECOND)
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._ping_payload = b""  # random per PING: only the peer that read it can answer it
        self._reserved = 0
        self.idle_since: float | None = time.monotonic()
        self.close_reason = ""
        self.lost_exc: Exception | None = None
        self.received_any = False

    @property
    def not_after(self) -> float | None:
        """When the connection stops taking new streams (`_check_expiry`), Unix time; None: never."""
        return self._not_after

    @not_after.setter
    def not_after(self, when: float | None) -> None:
        # For tests (nothing else moves it once the connection is made): the check runs again at once.
        self._not_after = when
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._transport is not None:
            self._check_expiry()

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        s = self.settings
        local: dict[int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.frame_size,
        }
        if self.client:
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
            local[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] = s.client_max_header_list
        else:
            local[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = s.server_max_streams
            local[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] = s.server_max_header_list
        self._h2.local_settings = h2.settings.Settings(client=self.client, initial_values=local)
        # We accept big frames from the moment we announce them: a peer may use them before our SETTINGS
        # is acknowledged, and h2 would otherwise only raise its limit on the ACK.
        self._h2.max_inbound_frame_size = s.frame_size
        self._h2.decoder.max_header_list_size = local[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE]
        self._h2.incoming_buffer.max_header_block = self._h2.decoder.max_header_list_size  # type: ignore[attr-defined]
        self._h2.initiate_connection()
        if s.connection_window > 65535:
            self._h2.increment_flow_control_window(s.connection_window - 65535)
        self._flush()
        self._handshake_timer = self._loop.call_later(s.handshake_timeout, self._handshake_timeout)
        self._schedule_ping()
        if self._not_after is not None:
            self._check_expiry()

    def data_received(self, data: bytes) -> None:
        """h2's `receive_data`, frame by frame, with plain DATA frames on open streams accounted for by
        `DataPath` (h2's counters, h2's errors) and everything else handled by h2 itself."""
        self.received_any = True
        if self._closed:
            return
        conn = self._h2
        buffer: FastFrameBuffer = conn.incoming_buffer  # type: ignore[assignment]
        buffer.max_frame_size = conn.max_inbound_frame_size
        try:
            items = buffer.feed(data)
        except InvalidPaddingError:
            conn._terminate_connection(ErrorCodes.PROTOCOL_ERROR)
            self._protocol_error(h2.exceptions.ProtocolError("Received frame with invalid padding."))
            return
        except h2.exceptions.ProtocolError as exc:
            if not isinstance(exc, PreambleError):
                conn._terminate_connection(exc.error_code)  # as h2's receive_data: GOAWAY first
            self._protocol_error(exc)
            return
        self._batch = True
        try:
            for item in items:
                if self._closed:
                    break
                try:
                    if type(item) is tuple:
                        stream_id, payload = item
                        if self._data_path.receive(stream_id, payload):
                            self._on_data(stream_id, payload)
                            continue
                        item = DataFrame(stream_id, payload)
                    events = conn._receive_frame(item)
                except h2.exceptions.ProtocolError as exc:
                    conn._terminate_connection(exc.error_code)
                    self._protocol_error(exc)
                    return
                if self._write_paused and self._flooded():
                    return
                for event in events:
                    try:
                        self._dispatch(event)
                    except Exception:
                        # A bug in one stream's consumer must cost that stream only, not every stream here.
                        self._isolate_failure(event)
        finally:
            self._batch = False
        self._flush()

    def _on_data(self, stream_id: int, payload: bytes) -> None:
        tunnel = self._streams.get(stream_id)
        if tunnel is None:
            self._connection_ack(len(payload))
            return
        try:
            tunnel._on_data(payload, len(payload))
        except Exception:
            log.exception("error handling data on %r; resetting that stream", tunnel)
            if not tunnel.finished:
                tunnel.abort(ErrorCodes.INTERNAL_ERROR)

    def eof_received(self) -> bool | None:
        self._lost("peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self._lost(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        # DATA waits until the transport drains; what h2 answers on its own (PING and SETTINGS ACKs, resets)
        # does not, and reading goes on (a peer that both writes and reads must never wait for us to read),
        # so that backlog is bounded instead, from here on (see `_flooded`).
        self._write_paused = True
        self._control_frames_at_pause = self._outbox.control_frames

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush_blocked(self._blocked)

    def _flush_blocked(self, blocked: set[Tunnel]) -> None:
        """Send what the `blocked` streams may send now, as long as the connection's window lasts. A connection
        WINDOW_UPDATE revisits only the streams whose own window has room: a peer that keeps every stream
        window at 0 and sends WINDOW_UPDATE(0, +1) frames must not make us walk every blocked stream for each."""
        for tunnel in list(blocked):
            if self._h2.outbound_flow_control_window <= 0:
                break
            self._flush_stream(tunnel)

    # -- events ------------------------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            tunnel = self._streams.get(event.stream_id)
            if tunnel is None:
                self._connection_ack(event.flow_controlled_length)
            else:
                tunnel._on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._flush_blocked(self._blocked_on_connection)
            elif (tunnel := self._streams.get(event.stream_id)) is not None:
                self._flush_stream(tunnel)
        elif isinstance(event, h2.events.StreamEnded):
            if (tunnel := self._streams.get(event.stream_id)) is not None:
                tunnel._on_remote_end()
        elif isinstance(event, h2.events.StreamReset):
            self._on_stream_reset(event)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
                self._cancel_handshake_timer()
            # A bigger stream window from the peer may unblock streams.
            grown = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if grown is not None and grown.new_value > (grown.original_value or 0):
                self._flush_blocked(self._blocked)
        elif isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == self._ping_payload:
                self._ping_sent_at = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._lost(f"peer ended the connection ({event.error_code!r})")

    def _isolate_failure(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        tunnel = self._streams.get(sid) if sid else None
        log.exception("error handling %s on %r; resetting that stream", type(event).__name__, tunnel or self)
        if tunnel is not None and not tunnel.finished:
            tunnel.abort(ErrorCodes.INTERNAL_ERROR)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        self._highest_inbound = max(self._highest_inbound, sid)
        headers = list(event.headers or [])
        tunnel = Tunnel(self, sid, headers)  # type: ignore[arg-type]
        if self.client or self.on_stream is None or self._draining:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.count_rejected(sid, "refused (REFUSED_STREAM): the connection takes no new streams")
            return
        self._streams[sid] = tunnel
        self.idle_since = None
        try:
            self.on_stream(tunnel)
        except Exception:
            log.exception("stream handler failed for %r", tunnel)
            if not tunnel.finished:
                tunnel.abort(ErrorCodes.INTERNAL_ERROR)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        tunnel = self._streams.get(event.stream_id)
        if tunnel is None:
            return
        headers: list[tuple[bytes, bytes]] = list(event.headers or [])  # type: ignore[arg-type]
        tunnel.response_headers = headers
        status = 0
        for k, v in headers:
            if k == b":status":
                with contextlib.suppress(ValueError):
                    status = int(v)
        tunnel.status = status
        waiter = self._pending_open.pop(event.stream_id, None)
        if status != 200:
            # An error answer ends the stream; there is no body.
            if not tunnel.finished:
                tunnel.abort(ErrorCodes.CANCEL)
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectRefused(status))
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(tunnel)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream_id, code = event.stream_id, event.error_code
        name = code_name(code)
        why = None
        tunnel = self._streams.get(stream_id)
        if isinstance(event, StreamRejected):
            # Our reset, for what the peer sent on this stream; the connection and its other streams go on,
            # unless the peer keeps doing it.
            why = f"stream reset ({name}): {event.reason}"
            if not self.count_rejected(stream_id, why):
                return
        elif (
            # A CONNECT reset before we answered it: by the peer, or by h2 for what the peer sent on it.
            not self.client and tunnel is not None and tunnel.status is None
            and not self._count_cancelled(stream_id, name)
        ):  # fmt: skip
            return
        waiter = self._pending_open.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamReset(f"CONNECT {why or f'stream reset by server ({name})'}", code))
        if tunnel is not None:
            tunnel._on_reset(code, why)

    def count_rejected(self, stream_id: int, why: str) -> bool:
        """A stream we reset or refused (a 400) for what the peer sent on it: logged at debug (a peer can send
        these as fast as it likes), and counted; False once the peer has had too many (REJECTED_STREAMS_BURST)
        and the connection is ended."""
        log.debug("HTTP/2 stream %d from %s: %s", stream_id, self.peer_name, why)
        if self._resets_left.take(self._loop.time()):
            return True
        log.warning("HTTP/2 peer %s: too many streams reset for what it sent on them (last: stream %d, %s); "
                    "closing", self.peer_name, stream_id, why)  # fmt: skip
        self._calm_down(f"too many streams reset for what the peer sent (last: {why}): ENHANCE_YOUR_CALM")
        return False

    def _count_cancelled(self, stream_id: int, code_name: str) -> bool:
        """A CONNECT the peer reset before we answered it: counted (CANCELLED_STREAMS_BURST); False once the peer
        has done it too often and the connection is ended."""
        if self._cancels_left.take(self._loop.time()):
            return True
        log.warning("HTTP/2 peer %s: too many streams reset by it before they were answered (last: stream %d, %s); "
                    "closing", self.peer_name, stream_id, code_name)  # fmt: skip
        self._calm_down(f"too many streams reset by the peer before they were answered ({code_name}): "
                        "ENHANCE_YOUR_CALM")  # fmt: skip
        return False

    def _on_goaway_frame(self, frame: GoAwayFrame) -> None:
        """The peer will take no new streams above `last_stream_id`; those at or below may finish."""
        self._goaway_received = True
        if frame.error_code != ErrorCodes.NO_ERROR:
            self._lost(f"peer sent GOAWAY {frame.error_code}")
            return
        for sid, tunnel in list(self._streams.items()):
            if sid > frame.last_stream_id and self.client:
                tunnel._on_connection_lost(ConnectionClosed("stream refused by GOAWAY"))
                waiter = self._pending_open.pop(sid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ConnectionClosed("server is draining (GOAWAY)"))
        self._close_if_idle()

    # -- client API --------------------------------------------------------------------------------------
    @property
    def max_streams(self) -> int:
        """Streams we may open at once: min(our cap, the server's SETTINGS_MAX_CONCURRENT_STREAMS)."""
        return min(self.settings.client_max_streams, self._h2.remote_settings.max_concurrent_streams)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def usable(self) -> bool:
        return not (self._closed or self._draining or self._goaway_received)

    @property
    def credit_owed(self) -> int:
        """Bytes of the connection's receive window consumed (or dropped) whose credit has not gone back yet:
        ours, gathered up to a quarter window, and h2's (for streams it ended itself)."""
        return self._connection_unacked + self._h2._inbound_flow_control_window_manager._bytes_processed

    @property
    def congested(self) -> bool:
        """Whether unread data holds so much of our receive window that a new stream here could stall: under
        half of it left means over a quarter is held by streams whose consumers do not read (credit goes back
        every quarter window, see `_ack`). On a pooled connection those are other clients' streams (a
        waypoint's connection to an endpoint carries every client's), so a new stream goes to another
        connection."""
        window = self._h2._inbound_flow_control_window_manager
        return window.current_window_size < window.max_window_size // 2

    def reserve(self) -> bool:
        """Claim a stream slot for a CONNECT about to be sent (the pool's admission check)."""
        if not self.usable or len(self._streams) + self._reserved >= self.max_streams or self.congested:
            return False
        self._reserved += 1
        self.idle_since = None
        return True

    def release_reservation(self) -> None:
        self._reserved = max(0, self._reserved - 1)
        if not self._streams and not self._reserved:
            self.idle_since = time.monotonic()
        self._close_if_idle()

    async def open_stream(
        self, authority: str, headers: list[tuple[str, str]] | None = None, *, reserved: bool = False
    ) -> Tunnel:
        """Send a CONNECT and wait for the answer. 200 gives the Tunnel; anything else raises."""
        if reserved:
            self._reserved = max(0, self._reserved - 1)
        if not self.usable:
            raise ConnectionClosed(f"connection {self.name} is closing")
        sid = self._h2.get_next_available_stream_id()
        block = [(":method", "CONNECT"), (":authority", authority), *(headers or [])]
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in block]
        tunnel = Tunnel(self, sid, encoded)
        self._streams[sid] = tunnel
        self.idle_since = None
        waiter: asyncio.Future[Tunnel] = self._loop.create_future()
        self._pending_open[sid] = waiter
        try:
            self._h2.send_headers(sid, encoded, end_stream=False)
        except h2.exceptions.ProtocolError as exc:
            self._streams.pop(sid, None)
            self._pending_open.pop(sid, None)
            raise ConnectionClosed(f"cannot open a stream: {exc}") from exc
        self._flush()
        try:
            return await waiter
        except asyncio.CancelledError:
            self._pending_open.pop(sid, None)
            if not tunnel.finished:
                tunnel.abort(ErrorCodes.CANCEL)
            raise

    # -- server API --------------------------------------------------------------------------------------
    def _send_response(self, tunnel: Tunnel, status: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if self._closed or tunnel.finished:
            return
        block = [(b":status", str(status).encode()), *((k.encode(), v.encode("latin-1")) for k, v in headers)]
        try:
            self._h2.send_headers(tunnel.stream_id, block, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            log.debug("cannot answer stream %d: %s", tunnel.stream_id, exc)
        self._flush()

    # -- stream plumbing (called by Tunnel) --------------------------------------------------------------
    def _flush_stream(self, tunnel: Tunnel) -> None:
        if self._closed or tunnel.finished:
            self._blocked.discard(tunnel)
            self._blocked_on_connection.discard(tunnel)
            return
        conn = self._h2
        sid = tunnel.stream_id
        queue = tunnel._send
        try:
            data_path = self._data_path
            while queue and not self._write_paused:
                room = data_path.room(sid)
                if room <= 0:
                    break
                chunk = queue[0]
                if len(chunk) <= room:
                    queue.popleft()
                else:
                    queue[0] = chunk[room:]
                    chunk = chunk[:room]
                # All of an immutable buffer goes as it is; anything else is copied, as h2 does with a
                # memoryview, because the writer may reuse its buffer.
                whole = chunk.obj
                data = whole if type(whole) is bytes and chunk.nbytes == len(whole) else bytes(chunk)
                if not data_path.send(sid, data):
                    conn.send_data(sid, data)
                tunnel._send_size -= len(data)
            if not queue and tunnel._eof_requested and not tunnel._local_ended:
                conn.end_stream(sid)
                tunnel._local_end_sent()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("stream %d cannot send: %s", sid, exc)
            queue.clear()
            tunnel._send_size = 0
        if queue:
            self._blocked.add(tunnel)
            stream = conn.streams.get(sid)
            if stream is not None and stream.outbound_flow_control_window > 0:
                self._blocked_on_connection.add(tunnel)
            else:
                self._blocked_on_connection.discard(tunnel)  # its own WINDOW_UPDATE will unblock it
        else:
            self._blocked.discard(tunnel)
            self._blocked_on_connection.discard(tunnel)
        if not self._batch:
            self._flush()
        tunnel._maybe_resume_protocol()

    def _send_now(self, tunnel: Tunnel, data: bytes) -> bool:
        """`_flush_stream` for the common case of one write on a stream with nothing queued that fits the
        windows as it is; False (nothing done) otherwise."""
        if self._write_paused or self._closed or tunnel.finished:
            return False
        sid = tunnel.stream_id
        data_path = self._data_path
        try:
            if len(data) > data_path.room(sid) or not data_path.send(sid, data):
                return False
        except h2.exceptions.ProtocolError:
            return False  # the stream is gone: `_flush_stream` deals with that
        if not self._batch:
            self._flush()
        return True

    def _ack(self, tunnel: Tunnel, flow_len: int) -> None:
        """The consumer took `flow_len` bytes of `tunnel` (or they were dropped): credit for them goes back to
        the peer once a quarter of the stream's or the connection's window is due, and the connection's at
        once while less than a quarter of its window is left (see `_held`).

        h2 would wait for half a window (as nghttp2 and Rust's h2 do). On double HBONE the inner stream's
        window covers every buffer of three hops (the source's outer connection, the gateway, the socket to the
        far ztunnel): with credit at half a window the source spent much of its time waiting for it, and
        bulk moved 20 % slower (bench double-hbone). A WINDOW_UPDATE per MiB of a stream costs nothing
        measurable, and none is sent for small messages until a quarter window has gone through."""
        if not flow_len or self._closed:
            return
        tunnel._unacked += flow_len
        if tunnel._unacked >= self._stream_update_at:
            self._give_stream_credit(tunnel)
        self._connection_unacked += flow_len
        update_at = self._connection_update_at
        if self._connection_unacked >= update_at or self._receive_window.current_window_size < update_at:
            self._give_connection_credit()

    def _connection_ack(self, flow_len: int) -> None:
        """`_ack` for bytes of a stream we no longer know: connection credit only."""
        if not flow_len or self._closed:
            return
        self._connection_unacked += flow_len
        update_at = self._connection_update_at
        if self._connection_unacked >= update_at or self._receive_window.current_window_size < update_at:
            self._give_connection_credit()

    def _held(self) -> None:
        """A stream kept what it received for a consumer not reading now. Once less than a quarter of the
        connection window is left, credit still owed goes back at once: the streams it is owed for have read
        everything they got, so nothing more may be consumed to push it over a quarter, and their senders
        would wait for ever behind data that is not read (h2 has the same rule for a window at zero)."""
        if self._connection_unacked and self._receive_window.current_window_size < self._connection_update_at:
            self._give_connection_credit()

    def _give_stream_credit(self, tunnel: Tunnel) -> None:
        credit, tunnel._unacked = tunnel._unacked, 0
        if tunnel.finished:
            return  # a closed stream takes no more data: only the connection's credit counts
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.increment_flow_control_window(credit, tunnel.stream_id)
        if not self._batch:
            self._flush()

    def _give_connection_credit(self) -> None:
        credit, self._connection_unacked = self._connection_unacked, 0
        self._h2.increment_flow_control_window(credit)
        if not self._batch:
            self._flush()

    def _reset(self, tunnel: Tunnel, code: int) -> None:
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(tunnel.stream_id, code)
        self._flush()

    def _stream_finished(self, tunnel: Tunnel) -> None:
        self._streams.pop(tunnel.stream_id, None)
        self._blocked.discard(tunnel)
        self._blocked_on_connection.discard(tunnel)
        waiter = self._pending_open.pop(tunnel.stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(tunnel.error or StreamReset("stream ended before the answer"))
        if not self._streams:
            self.idle_since = time.monotonic()
        self._close_if_idle()

    def _flush(self) -> None:
        if self._transport is None or self._closed:
            return
        if not self._outbox.chunks and not self._h2._data_to_send:
            return
        chunks = self._outbox.take()
        if len(chunks) == 1:
            self._transport.write(chunks[0])
        else:
            self._transport.writelines(chunks)

    # -- keepalive, handshake, drain, close --------------------------------------------------------------
    def _schedule_ping(self) -> None:
        if not self._closed and self.settings.ping_interval > 0:
            self._ping_timer = self._loop.call_later(self.settings.ping_interval, self._ping)

    def _ping(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= self.settings.ping_timeout:
                self.abort(f"no PING answer for {self.settings.ping_timeout:g}s")
                return
        else:
            self._ping_sent_at = now
            self._ping_payload = os.urandom(8)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.ping(self._ping_payload)
            self._flush()
        self._schedule_ping()

    def _flooded(self) -> bool:
        """Checked after each frame h2 handled while our writes are paused: a peer that keeps asking for
        answers (PINGs, SETTINGS, frames on reset streams) without reading them would grow our queue without
        bound. Past the limit the connection ends with GOAWAY ENHANCE_YOUR_CALM."""
        queued = self._outbox.control_frames - self._control_frames_at_pause
        if queued <= MAX_QUEUED_CONTROL_FRAMES:
            return False
        log.warning("HTTP/2 peer %s does not read: %d frames queued for it; closing", self.peer_name, queued)
        self._calm_down(f"peer does not read what it asks for ({queued} frames queued): ENHANCE_YOUR_CALM")
        return True

    def _calm_down(self, reason: str) -> None:
        """End the connection for abuse: GOAWAY ENHANCE_YOUR_CALM, and the socket is cut GOAWAY_GRACE later."""
        self._h2._terminate_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        transport = self._transport
        self.close(reason)
        if transport is not None:
            # close() waits for the queue to drain, which a peer that does not read may never let happen.
            self._loop.call_later(GOAWAY_GRACE, transport.abort)

    def _handshake_timeout(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(H2HandshakeFailure("no HTTP/2 SETTINGS from the peer in time"))
            self.ready.exception()  # mark retrieved: nobody may be waiting (a CONNECT sent at once reports it)
            self.abort(HANDSHAKE_TIMED_OUT)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _check_expiry(self) -> None:
        """Drain when the earlier of the two certificates expires; until then, wake up now and then (see
        EXPIRY_RECHECK). TLS checked both certificates only at the handshake, and past notAfter the identity on
        either side is no longer vouched for: a workload whose certificate is not renewed (revoked in effect,
        or its key leaked) could otherwise keep a connection and open new streams on it for ever. So no stream
        starts on a connection past that expiry; the streams already open go on (a TCP connection through the
        mesh is not cut because a certificate lapsed under it, as with any TLS session). It also bounds how long
        a client pool keeps using a connection made with a certificate that has since been renewed."""
        self._expiry_timer = None
        if self._closed or self._not_after is None:
            return
        remaining = self._not_after - time.time()
        if remaining > 0:
            self._expiry_timer = self._loop.call_later(min(remaining, EXPIRY_RECHECK), self._check_expiry)
            return
        log.info("HBONE connection %s: a certificate expired (notAfter %s); draining", self.peer_name,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._not_after)))
        self.drain()

    def drain(self) -> None:
        """Graceful drain: GOAWAY, no new streams; open streams go on; the connection closes when idle."""
        if self._draining or self._closed:
            return
        self._draining = True
        self._flush()
        if self._transport is not None:
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = self._highest_inbound
            goaway.error_code = ErrorCodes.NO_ERROR
            self._transport.write(goaway.serialize())
        self._close_if_idle()

    async def shutdown(self, deadline: float) -> None:
        """Drain, wait for open streams up to `deadline` seconds, then close whatever is left."""
        self.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), deadline)
        self.abort("drain deadline reached")

    def _close_if_idle(self) -> None:
        ending = self._draining or self._goaway_received or self.close_when_idle
        if ending and not self._streams and not self._reserved:
            self.close("drained")

    def close(self, reason: str = "closed") -> None:
        if self._closed:
            return
        self._flush()
        transport = self._transport
        self._lost(reason)
        if transport is not None:
            transport.close()

    def abort(self, reason: str) -> None:
        if self._closed:
            return
        transport = self._transport
        self._lost(reason)
        if transport is not None:
            transport.abort()

    def _protocol_error(self, exc: Exception) -> None:
        log.info("HTTP/2 protocol error from %s: %s", self.peer_name, exc)
        self._flush()  # h2 queued a GOAWAY
        if not self.ready.done():
            self.ready.set_exception(H2HandshakeFailure(f"HTTP/2 handshake failed: {exc}"))
        self.close(f"protocol error: {exc}")

    def _lost(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._cancel_handshake_timer()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if not self.ready.done():
            self.ready.set_exception(H2HandshakeFailure(f"HTTP/2 handshake failed: {reason}"))
            self.ready.exception()  # mark retrieved: a failed dial reports it elsewhere
        err = ConnectionClosed(f"HBONE connection closed: {reason}")
        for waiter in self._pending_open.values():
            if not waiter.done():
                waiter.set_exception(err)
        self._pending_open.clear()
        for tunnel in list(self._streams.values()):
            tunnel._on_connection_lost(err)
        self._streams.clear()
        self._blocked.clear()
        self._blocked_on_connection.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def peer_name(self) -> str:
        peer = self.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or self.name or "?")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peer_identity":
            return self.peer_identity
        if name == "local_identity":
            return self.local_identity
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    def __repr__(self) -> str:
        role = "client" if self.client else "server"
        return f"<HboneConnection {role} {self.name or self.peer_name} streams={len(self._streams)}>"
