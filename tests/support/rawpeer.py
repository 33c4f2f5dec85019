"""A hand-written HTTP/2 peer over mTLS: frames built byte by byte, and its own account of every window.

`RawPeer` is for tests that must send what h2 itself would refuse to (DATA over a window, DATA on a stream
that is not open, a frame over MAX_FRAME_SIZE) and check every frame that comes back. `RawServer` puts one
in the server role, for the HBONE client to dial. When h2's own client is enough, `rawh2.RawH2Client` is
simpler. `bounded` and `WAIT` keep a test that waits on such a peer from hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from hbone.client import dial
from hbone.connection import HboneConnection
from hbone.identity import Identity
from hbone.tunnel import Tunnel

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS = 0x0, 0x1
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8
ENABLE_PUSH, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x2, 0x4, 0x5
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
WAIT = 10.0  # seconds for any one thing to arrive


def bounded(seconds: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The test fails instead of hanging when its body takes longer than `seconds`."""

    def wrap(test: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            await asyncio.wait_for(test(*args, **kwargs), seconds)

        return run

    return wrap


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame, byte by byte: nothing here checks that it makes sense."""
    n = len(payload)
    return struct.pack("!HBBBL", n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


class RawPeer:
    """One end of an HTTP/2 connection written frame by frame, with its own account of every window.

    It answers SETTINGS and PING, decodes header blocks, and (by default) gives back flow-control credit for
    each DATA frame at once. Whatever the other side does wrong (a DATA frame over a window this peer
    granted, a frame over its MAX_FRAME_SIZE, DATA on a stream it never opened) is listed in `violations`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client: bool) -> None:
        self.reader, self.writer = reader, writer
        self.client = client
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self._buf = bytearray()
        self._expect_preface = not client
        self._header_block: tuple[int, bytearray, bool] | None = None
        self.next_stream_id = 1
        # What the other side lets us send.
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.send_conn_window = DEFAULT_WINDOW
        self.send_windows: dict[int, int] = {}
        self.settings_received = 0
        # What we let the other side send (our SETTINGS count from their ACK).
        self.local_window = DEFAULT_WINDOW
        self.local_max_frame = DEFAULT_FRAME
        self.recv_conn_window = DEFAULT_WINDOW
        self.recv_windows: dict[int, int] = {}
        self._pending_local: list[dict[int, int]] = []
        self.auto_window_update = True
        # What arrived.
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.data_frames = 0
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaways: list[tuple[int, int]] = []  # (last_stream_id, error_code)
        self.window_updates: list[tuple[int, int]] = []
        self.ping_acks: set[bytes] = set()
        self.violations: list[str] = []
        self.eof = False
        self.read_error: BaseException | None = None
        self._changed = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    async def connect(
        cls, address: tuple[str, int], ctx: ssl.SSLContext, *, window: int = DEFAULT_WINDOW, rcvbuf: int | None = None
    ) -> RawPeer:
        """A client connection. `rcvbuf` sets the socket's receive buffer before it connects, so that the TCP
        window stays that small and the other side feels at once when this peer stops reading."""
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
            reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="")
        peer = cls(reader, writer, client=True)
        peer.write(PREFACE)
        peer.send_settings({ENABLE_PUSH: 0, INITIAL_WINDOW_SIZE: window})
        await peer.until(lambda: peer.settings_received and not peer._pending_local, "the SETTINGS exchange")
        return peer

    # -- sending -------------------------------------------------------------------------------------------
    def write(self, raw: bytes) -> None:
        self.writer.write(raw)

    def send_settings(self, values: dict[int, int]) -> None:
        self.write(SettingsFrame(0, settings=values).serialize())
        self._pending_local.append(values)

    def open_stream(self, authority: str, extra: Iterable[tuple[str, str]] = (), *, sid: int | None = None) -> int:
        sid = self.next_stream_id if sid is None else sid
        self.next_stream_id = max(self.next_stream_id, sid + 2)
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", authority), *extra])
        self.write(frame(HEADERS, END_HEADERS, sid, block))
        self.send_windows[sid] = self.peer_initial_window
        self.recv_windows[sid] = self.local_window
        return sid

    async def connect_stream(
        self, authority: str, extra: Iterable[tuple[str, str]] = (), *, sid: int | None = None
    ) -> int:
        sid = self.open_stream(authority, extra, sid=sid)
        await self.until(lambda: sid in self.headers or sid in self.resets, f"the answer on stream {sid}")
        assert self.status(sid) == 200, (self.headers.get(sid), self.resets.get(sid))
        assert sid not in self.ended
        return sid

    def respond(self, sid: int, status: int = 200) -> None:
        self.write(frame(HEADERS, END_HEADERS, sid, self.encoder.encode([(":status", str(status))])))

    def send_data(self, sid: int, data: bytes = b"", *, end_stream: bool = False, pad: int | None = None) -> int:
        """One DATA frame, whatever the windows say; returns its flow-controlled length."""
        flags = END_STREAM if end_stream else 0
        payload = data
        if pad is not None:
            flags |= PADDED
            payload = bytes([pad]) + data + bytes(pad)
        self.write(frame(DATA, flags, sid, payload))
        self.send_conn_window -= len(payload)
        if sid in self.send_windows:
            self.send_windows[sid] -= len(payload)
        return len(payload)

    def room(self, sid: int) -> int:
        return min(self.send_conn_window, self.send_windows[sid])

    async def send_when_allowed(self, sid: int, data: bytes, *, pad: int | None = None) -> None:
        """One DATA frame, once both windows the other side granted have room for it."""
        need = len(data) + (0 if pad is None else 1 + pad)
        if self.room(sid) < need:
            await self.until(lambda: self.room(sid) >= need, f"window for {need} bytes on stream {sid}")
        self.send_data(sid, data, pad=pad)
        await self.writer.drain()

    def grant(self, sid: int, n: int) -> None:
        """WINDOW_UPDATE by `n` for stream `sid` (0: the connection)."""
        self.write(WindowUpdateFrame(sid, window_increment=n).serialize())
        if sid:
            self.recv_windows[sid] += n
        else:
            self.recv_conn_window += n

    async def ping(self) -> None:
        """A PING round trip: everything the other side sent before its answer has been read."""
        token = os.urandom(8)
        self.write(PingFrame(0, opaque_data=token).serialize())
        await self.until(lambda: token in self.ping_acks, "a PING ACK")

    def stop_reading(self) -> None:
        """Read nothing more, not even into a buffer here: what the other side sends waits on its side. (No
        more SETTINGS or PING answers either.)"""
        self._reading.cancel()
        self.writer.transport.pause_reading()

    # -- receiving -----------------------------------------------------------------------------------------
    async def until(self, cond: Callable[[], object], what: str, timeout: float = WAIT) -> None:
        async def wait() -> None:
            while not cond():
                if self.eof:
                    raise AssertionError(f"connection ended while waiting for {what}: {self.summary()}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}: {self.summary()}") from None

    async def closed(self) -> None:
        """Wait for the other side to end the connection."""
        await self.until(lambda: self.eof, "the connection to end")

    def status(self, sid: int) -> int | None:
        for k, v in self.headers.get(sid, []):
            if k == b":status":
                return int(v)
        return None

    def summary(self) -> str:
        return (
            f"goaways={self.goaways} resets={self.resets} ended={sorted(self.ended)} "
            f"violations={self.violations[:3]} read_error={self.read_error!r}"
        )

    async def _read_loop(self) -> None:
        try:
            while chunk := await self.reader.read(1 << 16):
                self._buf += chunk
                self._parse()
                self._changed.set()
        except Exception as exc:  # a reset or TLS error is also how a connection can end
            self.read_error = exc
        finally:
            self.eof = True
            self._changed.set()

    def _parse(self) -> None:
        buf = self._buf
        if self._expect_preface:
            if len(buf) < len(PREFACE):
                return
            assert bytes(buf[: len(PREFACE)]) == PREFACE
            del buf[: len(PREFACE)]
            self._expect_preface = False
        pos = 0
        while len(buf) - pos >= 9:
            f, length = Frame.parse_frame_header(memoryview(bytes(buf[pos : pos + 9])))
            if len(buf) - pos - 9 < length:
                break
            f.parse_body(memoryview(bytes(buf[pos + 9 : pos + 9 + length])))
            pos += 9 + length
            self._on_frame(f, length)
        del buf[:pos]

    def _on_frame(self, f: Frame, length: int) -> None:
        if isinstance(f, DataFrame):
            self._on_data(f, length)
        elif isinstance(f, HeadersFrame):
            self._header_block = (f.stream_id, bytearray(f.data), "END_STREAM" in f.flags)
            if "END_HEADERS" in f.flags:
                self._on_header_block()
        elif isinstance(f, ContinuationFrame):
            assert self._header_block is not None
            self._header_block[1].extend(f.data)
            if "END_HEADERS" in f.flags:
                self._on_header_block()
        elif isinstance(f, SettingsFrame):
            self._on_settings(f)
        elif isinstance(f, WindowUpdateFrame):
            self.window_updates.append((f.stream_id, f.window_increment))
            if f.stream_id == 0:
                self.send_conn_window += f.window_increment
            else:
                self.send_windows[f.stream_id] = (
                    self.send_windows.get(f.stream_id, self.peer_initial_window) + f.window_increment
                )
        elif isinstance(f, PingFrame):
            if "ACK" in f.flags:
                self.ping_acks.add(bytes(f.opaque_data))
            else:
                self.write(PingFrame(0, flags=["ACK"], opaque_data=f.opaque_data).serialize())
        elif isinstance(f, RstStreamFrame):
            self.resets[f.stream_id] = f.error_code
        elif isinstance(f, GoAwayFrame):
            self.goaways.append((f.last_stream_id, f.error_code))

    def _on_header_block(self) -> None:
        assert self._header_block is not None
        sid, block, end = self._header_block
        self._header_block = None
        headers = self.decoder.decode(bytes(block), raw=True)
        if sid not in self.headers:
            self.headers[sid] = headers
        if sid not in self.recv_windows:  # a stream the other side opened
            self.recv_windows[sid] = self.local_window
            self.send_windows[sid] = self.peer_initial_window
        if end:
            self.ended.add(sid)

    def _on_settings(self, f: SettingsFrame) -> None:
        if "ACK" in f.flags:
            values = self._pending_local.pop(0)
            if INITIAL_WINDOW_SIZE in values:
                delta = values[INITIAL_WINDOW_SIZE] - self.local_window
                self.local_window = values[INITIAL_WINDOW_SIZE]
                for sid in self.recv_windows:
                    self.recv_windows[sid] += delta
            self.local_max_frame = values.get(MAX_FRAME_SIZE, self.local_max_frame)
            return
        for key, value in f.settings.items():
            if key == INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for sid in self.send_windows:
                    self.send_windows[sid] += delta
            elif key == MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.settings_received += 1
        self.write(SettingsFrame(0, flags=["ACK"]).serialize())

    def _on_data(self, f: DataFrame, length: int) -> None:
        sid, flow = f.stream_id, f.flow_controlled_length
        self.data_frames += 1
        if length > self.local_max_frame:
            self.violations.append(f"DATA frame of {length} bytes over our MAX_FRAME_SIZE {self.local_max_frame}")
        self.recv_conn_window -= flow
        if self.recv_conn_window < 0:
            self.violations.append(f"connection window overrun: {self.recv_conn_window}")
        if sid not in self.recv_windows:
            self.violations.append(f"DATA on stream {sid}, which we never opened")
        else:
            self.recv_windows[sid] -= flow
            if self.recv_windows[sid] < 0:
                self.violations.append(f"stream {sid} window overrun: {self.recv_windows[sid]}")
        if sid in self.ended:
            self.violations.append(f"DATA on stream {sid} after its END_STREAM")
        self.data[sid] += f.data
        end = "END_STREAM" in f.flags
        if end:
            self.ended.add(sid)
        if self.auto_window_update and flow:
            self.write(WindowUpdateFrame(0, window_increment=flow).serialize())
            self.recv_conn_window += flow
            if not end and sid in self.recv_windows:
                self.write(WindowUpdateFrame(sid, window_increment=flow).serialize())
                self.recv_windows[sid] += flow

    async def close(self) -> None:
        self._reading.cancel()
        with contextlib.suppress(BaseException):
            await self._reading
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


class RawServer:
    """A TLS listener whose one connection is a RawPeer in the server role."""

    def __init__(self, ctx: ssl.SSLContext, local: dict[int, int]) -> None:
        self.ctx = ctx
        self.local = local
        self.peer: asyncio.Future[RawPeer] = asyncio.get_running_loop().create_future()
        self.server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = RawPeer(reader, writer, client=False)
            peer.send_settings(self.local)
            if not self.peer.done():
                self.peer.set_result(peer)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=self.ctx)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.peer.done():
            await self.peer.result().close()
        if self.server is not None:
            self.server.close()


async def client_with_stream(
    srv: RawServer, ctx: ssl.SSLContext, server: Identity
) -> tuple[HboneConnection, Tunnel, RawPeer, int]:
    """An HBONE client connection to `srv` (dialled with `ctx`, expecting `server`) and its answered CONNECT
    stream: (conn, tunnel, peer, sid)."""
    conn = await asyncio.wait_for(dial(srv.address, ctx, [server]), WAIT)
    peer = await asyncio.wait_for(srv.peer, WAIT)
    await peer.until(lambda: not peer._pending_local and peer.settings_received, "the SETTINGS exchange")
    opening = asyncio.ensure_future(conn.open_stream("127.0.0.1:9"))
    await peer.until(lambda: peer.headers, "the CONNECT")
    (sid,) = peer.headers
    peer.respond(sid)
    tunnel = await asyncio.wait_for(opening, WAIT)
    return conn, tunnel, peer, sid
