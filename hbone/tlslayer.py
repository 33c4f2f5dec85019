"""TLS over any asyncio Transport: a TCP socket, or a CONNECT stream for double HBONE's inner session.

The event loop can only start TLS on its own socket transports, and the inner session of double HBONE runs
inside a `Tunnel`; so this module drives an `ssl.SSLObject` over memory BIOs on top of any transport and
presents the decrypted side as a transport again. We use it for sockets too: the loop's TLS asks OpenSSL for
256 KiB (and allocates that much) for every record it reads, which made a 1 KiB request cost a third more CPU
end to end; here records are read into one scratch buffer and handed up in one piece (bench: same bulk
throughput, 33 % less CPU per small request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

log = logging.getLogger("hbone.tls")

READ_CHUNK = 256 * 1024
# One buffer for every session's decryption: the event loop runs one callback at a time, and each batch is
# copied out before anything else can run.
_SCRATCH_VIEW = memoryview(bytearray(READ_CHUNK))
# One buffer for every socket's encrypted bytes, read straight into it (see _SocketLower).
_SOCKET_VIEW = memoryview(bytearray(READ_CHUNK))


class Buffered(asyncio.Protocol):
    """A stand-in protocol that keeps whatever arrives until the real protocol is attached."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None
        self.paused_writing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def attach(transport: asyncio.Transport, placeholder: Buffered, protocol: asyncio.Protocol) -> None:
    """Give `transport` its real protocol and replay what the placeholder kept, in order."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if placeholder.paused_writing:
        protocol.pause_writing()
    if placeholder.chunks:
        protocol.data_received(placeholder.take())
    if placeholder.eof:
        protocol.eof_received()
    if placeholder.lost is not None:
        protocol.connection_lost(placeholder.lost[0])


class TlsOverTransport(asyncio.Transport):
    """A TLS session over `lower`, itself a Transport for the protocol above."""

    def __init__(self, lower: asyncio.Transport, context: ssl.SSLContext, server_side: bool) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._lower = lower
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        # server_hostname=None: no SNI, as HBONE clients send none.
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=None)
        self._protocol: asyncio.Protocol = Buffered()
        self._protocol.connection_made(self)
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self._handshaken = False  # handshake.done(), remembered once true (checked for every read)
        self._copies_input = False  # whether the protocol above copies what it is given at once
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._eof = False
        self.lost_exc: Exception | None = None
        previous = lower.get_protocol()
        on_socket = lower.get_extra_info("socket") is not None and lower.get_extra_info("tunnel") is None
        lower.set_protocol(_SocketLower(self) if on_socket else _Lower(self))
        self._do_handshake()
        # Bytes the lower transport delivered before we took it over (a client's first flight) come first.
        if isinstance(previous, Buffered):
            if previous.chunks:
                self._on_lower_data(previous.take())
            if previous.eof:
                self._on_lower_eof()

    # -- driven by the lower transport ----------------------------------------------------------------
    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_out()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush_out()
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            self._lower.close()
            return
        self._flush_out()
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._read_app()

    def _on_lower_data(self, data: bytes | memoryview) -> None:
        self._in.write(data)
        if self._handshaken or self.handshake.done():
            self._handshaken = True
            self._read_app()
        else:
            self._do_handshake()

    def _read_app(self) -> None:
        """Decrypt everything that can be decrypted now, and hand it up as one piece.

        OpenSSL returns one record (16 KiB at most) per read, and `read(n)` allocates n bytes before it knows
        how many it will fill; so records are read into one scratch buffer and copied out once per batch:
        one allocation of the right size, and one `data_received` for the whole batch.
        """
        while not self._reading_paused and not self._lost:
            total = 0
            ended = False
            try:
                while total < READ_CHUNK:
                    n = self._ssl.read(READ_CHUNK - total, _SCRATCH_VIEW[total:])
                    if not n:
                        ended = True
                        break
                    total += n
                    if not self._in.pending and not self._ssl.pending():
                        break  # all ciphertext used, no plaintext held: another read would only raise
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                ended = True
            except ssl.SSLError as exc:
                log.info("TLS error: %s", exc)
                self._connection_lost(exc)
                self._lower.abort()
                return
            if total:
                chunk = _SCRATCH_VIEW[:total]
                # A protocol that copies what it is given before doing anything else (HTTP/2's frame buffer)
                # may read the scratch buffer itself; anyone else gets a copy, made before the callback,
                # which may decrypt another session into the scratch buffer.
                self._protocol.data_received(chunk if self._copies_input else bytes(chunk))
            if ended:
                self._on_eof()
                break
            if total < READ_CHUNK:
                break  # nothing more to decrypt until the next bytes arrive
        self._flush_out()

    def _on_eof(self) -> None:
        if not self._eof:
            self._eof = True
            keep_open = self._protocol.eof_received()
            if not keep_open:
                self.close()

    def _on_lower_eof(self) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError("connection closed during the TLS handshake"))
        else:
            self._in.write_eof()
            self._read_app()
            self._on_eof()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.lost_exc = exc
        if not self.handshake.done():
            lost = exc or ConnectionResetError("connection lost during the TLS handshake")
            self.handshake.set_exception(lost)
        self._protocol.connection_lost(exc)

    def _flush_out(self) -> None:
        if self._out.pending:
            self._lower.write(self._out.read())

    # -- asyncio.Transport for the protocol above ----------------------------------------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
        self._copies_input = bool(getattr(protocol, "copies_input", False))

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        return self._lower.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return
        self._ssl.write(data)
        self._flush_out()

    def writelines(self, list_of_data: Any) -> None:
        if self._closing or self._lost:
            return
        for data in list_of_data:
            self._ssl.write(data)  # each piece straight into TLS, no join
        self._flush_out()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def pause_reading(self) -> None:
        self._reading_paused = True
        self._lower.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._lower.resume_reading()
            self._read_app()

    def is_reading(self) -> bool:
        return not self._reading_paused

    def get_write_buffer_size(self) -> int:
        return self._lower.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._lower.set_write_buffer_limits(high, low)

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError, ValueError):
            self._ssl.unwrap()  # queue close_notify
        self._flush_out()
        self._lower.close()

    def abort(self) -> None:
        self._closing = True
        self._lower.abort()


class _LowerEvents:
    """What the lower transport reports besides data, for both kinds of lower protocol below."""

    def __init__(self, tls: TlsOverTransport) -> None:
        self._tls = tls

    def eof_received(self) -> bool:
        self._tls._on_lower_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls._connection_lost(exc)

    def pause_writing(self) -> None:
        self._tls._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._tls._protocol.resume_writing()


class _Lower(_LowerEvents, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self._tls._on_lower_data(data)


class _SocketLower(_LowerEvents, asyncio.BufferedProtocol):
    """For a socket transport: the loop reads into our buffer, which the TLS BIO copies at once, instead of
    allocating a bytes object per read that the BIO then copies again. (Not an asyncio.Protocol as well:
    uvloop would then call data_received.)"""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SOCKET_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self._tls._on_lower_data(_SOCKET_VIEW[:nbytes])


async def wrap_tls(
    lower: asyncio.Transport, context: ssl.SSLContext, *, server_side: bool, timeout: float = 10.0
) -> tuple[TlsOverTransport, Buffered]:
    """Run a TLS handshake over `lower`; returns the TLS transport and the placeholder holding early data."""
    tls = TlsOverTransport(lower, context, server_side)
    placeholder = tls.get_protocol()
    assert isinstance(placeholder, Buffered)
    try:
        await asyncio.wait_for(asyncio.shield(tls.handshake), timeout)
    except BaseException:
        tls.abort()
        raise
    return tls, placeholder
