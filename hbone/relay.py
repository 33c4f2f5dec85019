"""The bidirectional relay between two transports (a TCP socket and a tunnel, or two of either).

Callbacks only: bytes read from one side are written to the other in the same callback, and back-pressure
travels as pause/resume (a side whose writes back up stops reading from the other). EOF on one side becomes
a half-close on the other while the opposite direction carries on (SPEC §3.5); a side that ends without error
(a stream reset with NO_ERROR or CANCEL) closes the other; an error or RST on one side becomes a reset of the
other (RST_STREAM CONNECT_ERROR on a tunnel, TCP RST on a socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from .tlslayer import Buffered


@dataclass(frozen=True, slots=True)
class RelayResult:
    a_to_b: int
    b_to_a: int
    error: BaseException | None  # the first error either side reported, None for a clean end


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Abort with a reset: RST_STREAM CONNECT_ERROR for a tunnel, TCP RST for a socket."""
    reset = getattr(transport, "reset", None)
    if callable(reset):
        reset()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Relay:
    """Copies bytes a→b and b→a until both directions have ended or one side failed."""

    def __init__(self) -> None:
        # Bytes a→b and b→a, updated in place as they flow: metrics read them when they want (no callback
        # per chunk on the hot path).
        self.counts = [0, 0]
        self.error: BaseException | None = None
        self._ends: tuple[_End, _End] | None = None
        self.done: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()

    def start(self, a: asyncio.Transport, b: asyncio.Transport) -> asyncio.Future[RelayResult]:
        """Take over both transports. What a `Buffered` placeholder on either kept is relayed first."""
        end_a, end_b = _End(self, 0, a), _End(self, 1, b)
        end_a.peer, end_b.peer = end_b, end_a
        self._ends = (end_a, end_b)
        previous = (a.get_protocol(), b.get_protocol())
        a.set_protocol(end_a)
        b.set_protocol(end_b)
        for end, proto in zip((end_a, end_b), previous, strict=True):
            if isinstance(proto, Buffered):
                if proto.paused_writing:
                    end.pause_writing()
                if proto.chunks:
                    end.data_received(proto.take())
                if proto.eof:
                    end.eof_received()
                if proto.lost is not None:
                    end.connection_lost(proto.lost[0])
        return self.done

    @property
    def a_to_b(self) -> int:
        return self.counts[0]

    @property
    def b_to_a(self) -> int:
        return self.counts[1]

    def _fail(self, source: _End, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        reset_transport(source.peer.transport)

    def _maybe_done(self) -> None:
        assert self._ends is not None
        a, b = self._ends
        if a.closed and b.closed and not self.done.done():
            self.done.set_result(RelayResult(self.a_to_b, self.b_to_a, self.error))
        elif a.eof and b.eof:
            # Both directions ended: close what is still open (a TCP socket stays open after EOF).
            for end in (a, b):
                if not end.closed and not end.transport.is_closing():
                    end.transport.close()

    def abort(self) -> None:
        """Stop relaying now; both sides are reset."""
        if self._ends is not None:
            for end in self._ends:
                if not end.closed:
                    reset_transport(end.transport)


class _End(asyncio.Protocol):
    """The protocol on one side: what it reads goes to the peer side's transport."""

    def __init__(self, relay: Relay, direction: int, transport: asyncio.Transport) -> None:
        self.relay = relay
        self.direction = direction
        self.counts = relay.counts
        self.transport = transport
        self.peer: _End
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - set by start
        pass

    def data_received(self, data: bytes) -> None:
        self.counts[self.direction] += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self._end_peer()
        self.relay._maybe_done()
        return True  # keep our write side open: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            self.relay._fail(self, exc)
        elif not self.peer.closed and not self.peer.transport.is_closing():
            # A clean end of both directions at once (a stream reset with NO_ERROR or CANCEL, or our own close):
            # nothing can come from this side nor go to it any more, so the other side is closed too, after
            # what was written to it. Waiting for it to close first would wait forever on an application
            # that never does. (An EOF alone is a half-close, handled in eof_received.)
            self.peer.transport.close()
        self.relay._maybe_done()

    def _end_peer(self) -> None:
        """Half-close the other side (TLS, which cannot half-close, is closed)."""
        peer = self.peer.transport
        if peer.is_closing():
            return
        if not peer.can_write_eof():
            peer.close()
            return
        try:
            peer.write_eof()
        except OSError as exc:
            # The other side is already gone (say, its application just reset it): end this relay with a
            # reset of our side. The error must not escape into whatever is delivering our data (an HTTP/2
            # connection carrying other streams).
            self.relay._fail(self.peer, exc)

    def pause_writing(self) -> None:
        # Our transport's write buffer is full: stop reading from the other side.
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()
