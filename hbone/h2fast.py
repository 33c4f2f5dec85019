"""Changes to `h2`'s byte handling that matter at tunnel speeds. The protocol rules stay h2's.

1. `h2` logs every received frame with `repr(frame)` evaluated eagerly, and hyperframe's DATA frame repr
   hex-encodes the whole payload (up to 1 MiB) only to keep 20 characters of it. We give DATA frames a
   repr that touches neither the payload nor the flags. It only changes debug text.
2. `h2` treats a received GOAWAY as the end of the connection and refuses to send anything more, so the
   streams that GOAWAY lets finish (RFC 9113 §6.8) could not. Our frame buffer takes GOAWAY frames out of
   the stream and reports them to the connection, which stops opening streams and lets the others finish.
3. `h2`'s FrameBuffer slices a copy of each frame's body out of its buffer before parsing it (DATA parsing
   copies it again), and deletes each frame from the front of the buffer. Ours parses from a memoryview
   and compacts the buffer once per `receive_data` call instead of once per frame.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from h2.connection import H2Connection
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame


def _data_repr(self: DataFrame) -> str:
    return f"DataFrame(stream_id={self.stream_id}): <{len(self.data)} bytes>"


DataFrame.__repr__ = _data_repr  # type: ignore[method-assign]

_FRAME_HEADER = struct.Struct("!HBBBL")
_DATA_TYPE = 0x0
_END_STREAM = 0x1
SMALL_FRAME = 16 * 1024  # below this a DATA payload is joined to its header (one copy, one TLS record)


class FastFrameBuffer(FrameBuffer):
    """FrameBuffer that parses frames in place and trims consumed bytes once per batch."""

    def __init__(self, server: bool = False, on_goaway: Callable[[GoAwayFrame], None] | None = None) -> None:
        super().__init__(server=server)
        self._offset = 0
        self._on_goaway = on_goaway

    def add_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._offset:
            del self._data[: self._offset]
            self._offset = 0
        super().add_data(data)

    def __next__(self) -> Frame:
        while True:
            start = self._offset
            available = len(self._data) - start
            if available < 9:
                raise StopIteration
            view = memoryview(self._data)
            try:
                try:
                    frame, length = Frame.parse_frame_header(view[start : start + 9])
                except (InvalidDataError, InvalidFrameError) as err:
                    raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
                if available < length + 9:
                    raise StopIteration
                self._validate_frame_length(length)
                try:
                    # DATA frames copy their payload out of the view; other frames are small.
                    frame.parse_body(view[start + 9 : start + 9 + length])
                except InvalidDataError as err:
                    raise ProtocolError("Received frame with non-compliant data") from err
                except InvalidFrameError as err:
                    raise FrameDataMissingError("Frame data missing or invalid") from err
            finally:
                view.release()
            self._offset = start + 9 + length
            if isinstance(frame, GoAwayFrame) and self._on_goaway is not None and not self._headers_buffer:
                self._on_goaway(frame)
                continue
            result = self._update_header_buffer(frame)
            if result is not None:
                return result


class Outbox:
    """Outgoing bytes in order, with DATA payloads kept as the buffers they arrived in.

    h2 serializes a DATA frame by copying its payload into the frame, then into its send buffer, then out of
    it: three copies of every byte before TLS copies it once more to encrypt it. The outbox takes h2's frames
    as h2 prepares them, writes a 9-byte header for each DATA frame and keeps the payload as it is; the
    transport's `writelines` hands each piece to TLS. Other frames are serialized by h2 as usual.
    """

    def __init__(self, conn: H2Connection) -> None:
        self._conn = conn
        self.chunks: list[bytes | memoryview] = []

    def prepare(self, frames: list[Frame]) -> None:
        if not frames:
            return
        self._move_direct()
        chunks = self.chunks
        for f in frames:
            if type(f) is DataFrame and not f.pad_length and "PADDED" not in f.flags:
                n = len(f.data)
                f.body_len = n
                flags = _END_STREAM if "END_STREAM" in f.flags else 0
                header = _FRAME_HEADER.pack(n >> 8, n & 0xFF, _DATA_TYPE, flags, f.stream_id & 0x7FFFFFFF)
                if n > SMALL_FRAME:
                    chunks.append(header)
                    chunks.append(f.data)
                else:  # one piece, so a small message is one TLS record, not two
                    chunks.append(header + f.data)
            else:
                chunks.append(f.serialize())

    def _move_direct(self) -> None:
        # h2 writes its connection preamble straight into its own buffer; keep it first.
        if self._conn._data_to_send:
            self.chunks.append(self._conn.data_to_send())

    def take(self) -> list[bytes | memoryview]:
        if self._conn._data_to_send:
            self._move_direct()
        chunks, self.chunks = self.chunks, []
        return chunks


def make_connection(config: object, on_goaway: Callable[[GoAwayFrame], None]) -> H2Connection:
    conn = H2Connection(config=config)  # type: ignore[arg-type]
    fast = FastFrameBuffer(server=not conn.config.client_side, on_goaway=on_goaway)
    fast.max_frame_size = conn.incoming_buffer.max_frame_size
    conn.incoming_buffer = fast
    return conn


def install_outbox(conn: H2Connection) -> Outbox:
    outbox = Outbox(conn)
    conn._prepare_for_sending = outbox.prepare  # type: ignore[method-assign]
    return outbox
