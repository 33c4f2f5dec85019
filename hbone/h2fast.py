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
4. DATA frames on an open stream are the bulk of a tunnel's frames, and for them h2's work is bookkeeping:
   two state machines that stay where they are, two flow-control windows, an event object. `DataPath`
   does that bookkeeping on h2's own counters, in h2's order and with h2's errors, for the plain case
   only (stream open both ways or half-closed as the direction allows, no padding, no END_STREAM, no
   content-length to track); every other frame and every other case goes through h2 unchanged.
5. Header blocks are sent without Huffman coding (HPACK lets each string be either, RFC 7541 §5.2). The
   pure-Python Huffman coder was the largest single cost of opening a stream (encoding here, decoding at
   the peer); the strings of a CONNECT are a few dozen bytes, once per stream. Received blocks are decoded
   whatever their coding.
6. `h2` ends the whole connection (GOAWAY) for errors RFC 9113 makes errors of one stream: a malformed
   header block or a body that does not match its content-length (§8.1.1: RST_STREAM PROTOCOL_ERROR) and a
   stream over our SETTINGS_MAX_CONCURRENT_STREAMS (§5.1.2: RST_STREAM REFUSED_STREAM, which a client may
   retry). On a pooled HBONE connection that would
   cost every tunnel on it. `HboneH2Connection` resets only that stream; every other error stays h2's.
7. `h2` checks the size of a header list only once its block is complete, and keeps up to 64 frames of the
   block until then (64 MiB with our MAX_FRAME_SIZE). Our frame buffer bounds the block as it grows. It
   also refuses a frame over MAX_FRAME_SIZE at its header, where h2 waits for the whole frame (16 MiB), and
   a SETTINGS frame of more than MAX_SETTINGS parameters (ENHANCE_YOUR_CALM).
8. A plain DATA frame that is still arriving is handed on piece by piece as its bytes come (each piece is
   accounted for as a DATA frame of its size: the windows end where the whole frame would put them), so a
   large frame is copied once, out of the batch it arrived in, instead of being gathered first.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.events import (
    Event,
    InformationalResponseReceived,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameDataMissingError,
    InvalidBodyLengthError,
    ProtocolError,
    TooManyStreamsError,
)
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamInputs, StreamState
from h2.utilities import validate_headers
from hpack import Encoder
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame


def _data_repr(self: DataFrame) -> str:
    return f"DataFrame(stream_id={self.stream_id}): <{len(self.data)} bytes>"


DataFrame.__repr__ = _data_repr  # type: ignore[method-assign]

_FRAME_HEADER = struct.Struct("!HBBBL")
_DATA_TYPE = 0x0
_END_STREAM = 0x1
_PADDED = 0x8
# States compared by identity: `state in {...}` would call Enum.__hash__, a Python function, every frame.
_CLIENT_OPEN, _SERVER_OPEN = ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN
_OPEN, _HALF_LOCAL, _HALF_REMOTE = StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE
SMALL_FRAME = 16 * 1024  # below this a DATA payload is joined to its header (one copy, one TLS record)
MAX_SETTINGS = 32  # parameters in one SETTINGS frame (nghttp2's max_settings; HTTP/2 defines six)
PIECE_MIN = 16 * 1024  # an unfinished plain DATA frame with at least this much payload here is passed on now


class PlainEncoder(Encoder):
    """An HPACK encoder that writes string literals as they are (point 5)."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=huffman)


class PreambleError(ProtocolError):
    """The client's first bytes are not HTTP/2's connection preamble (h2 answers nothing to that)."""


class FastFrameBuffer(FrameBuffer):
    """FrameBuffer that parses frames in place and trims consumed bytes once per batch."""

    def __init__(self, server: bool = False, on_goaway: Callable[[GoAwayFrame], None] | None = None) -> None:
        super().__init__(server=server)
        self._offset = 0
        self._on_goaway = on_goaway
        self._goaways: list[GoAwayFrame] | None = None  # collected while feed() parses a batch
        # A plain DATA frame being passed on as it arrives (point 8): its stream and the payload still to come.
        self._piece_stream = 0
        self._piece_left = 0
        # Bytes of an unfinished header block we keep (its connection sets our SETTINGS_MAX_HEADER_LIST_SIZE).
        self.max_header_block = 64 * 1024

    def add_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._offset:
            del self._data[: self._offset]
            self._offset = 0
        super().add_data(data)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | tuple[int, bytes]]:
        """Add `data` and take every complete frame (as `next_item` gives them). When nothing is left over
        from earlier calls, frames are parsed from `data` itself and only an incomplete tail is kept: a
        batch is not first copied into the buffer. On a protocol error nothing of the batch is returned,
        as h2's `receive_data` returns no events then."""
        if self._offset:
            del self._data[: self._offset]
            self._offset = 0
        # GOAWAY is reported once the batch is parsed: what the report sets off (streams ending, a nested
        # TLS session closing) must not run while `data`, which may be a shared decryption buffer, is read.
        self._goaways = []
        try:
            items = self._parse(data)
        finally:
            goaways, self._goaways = self._goaways, None
        if self._on_goaway is not None:
            for frame in goaways:
                self._on_goaway(frame)
        return items

    def _parse(self, data: bytes | bytearray | memoryview) -> list[Frame | tuple[int, bytes]]:
        items: list[Frame | tuple[int, bytes]] = []
        if self._piece_left:  # the rest of a DATA frame comes first (nothing else is buffered meanwhile)
            n = min(self._piece_left, len(data))
            self._piece_left -= n
            with memoryview(data) as view:
                items.append((self._piece_stream, bytes(view[:n])))
            if n == len(data):
                return items
            data = memoryview(data)[n:]
        if self._data or self._preamble_len:
            try:
                super().add_data(data)  # checks the client preamble
            except ProtocolError as exc:
                raise PreambleError(str(exc)) from exc
            while (item := self.next_item()) is not None:
                items.append(item)
            return items
        own = self._data
        self._data = data  # type: ignore[assignment]  # read-only use until restored below
        try:
            while (item := self.next_item()) is not None:
                items.append(item)
            tail = bytearray(data[self._offset :])
        finally:
            self._data = own
        self._offset = 0
        own += tail
        return items

    def next_item(self) -> Frame | tuple[int, bytes] | None:
        """The next complete frame, or `(stream_id, payload)` for a plain DATA frame (no padding, no
        END_STREAM, not inside a header block), or None when no complete frame is buffered."""
        start = self._offset
        data = self._data
        if len(data) - start < 9:
            return None  # not even a frame header yet
        high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(data, start)
        length = (high << 8) | low
        stream_id &= 0x7FFFFFFF
        if (
            kind == _DATA_TYPE
            and not flags & (_PADDED | _END_STREAM)
            and stream_id
            and not self._headers_buffer
            and length <= self.max_frame_size
        ):
            end = start + 9 + length
            if end > len(data):
                if len(data) - start - 9 < PIECE_MIN:
                    return None
                # Pass on what is here; the rest of the payload follows as it arrives (point 8).
                end = len(data)
                self._piece_stream, self._piece_left = stream_id, start + 9 + length - end
            self._offset = end
            with memoryview(data) as view:
                return stream_id, bytes(view[start + 9 : end])  # one copy (a bytearray slice is two)
        try:
            return self.__next__()
        except StopIteration:
            return None

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
                # Checked at the header, not once the body is in (h2's order): a peer must not get us to keep
                # up to 16 MiB of a frame that is refused anyway.
                self._validate_frame_length(length)
                if type(frame) is SettingsFrame and length > MAX_SETTINGS * 6:
                    # h2 applies every parameter in Python: a 1 MiB SETTINGS frame (174,762 of them) held the
                    # event loop half a second. nghttp2 refuses more than 32 (CVE-2020-11080).
                    raise DenialOfServiceError(f"SETTINGS frame with {length // 6} parameters (at most {MAX_SETTINGS})")
                if available < length + 9:
                    raise StopIteration
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
                if self._goaways is not None:
                    self._goaways.append(frame)  # reported by feed() after the batch
                else:
                    self._on_goaway(frame)
                continue
            result = self._update_header_buffer(frame)
            if result is not None:
                return result

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        """h2's, plus a bound on the block collected so far: h2 checks the header list's size only once the
        block is complete, and keeps up to 64 frames of our MAX_FRAME_SIZE (1 MiB) each until then. An HPACK
        block is smaller than the size its list counts for (RFC 9113 §6.5.2: the strings plus 32 per field)
        unless its strings are Huffman codes of unusual bytes, so a longer block is treated as h2 treats an
        oversized header list: a connection error ENHANCE_YOUR_CALM."""
        f = super()._update_header_buffer(f)
        if self._headers_buffer:
            size = sum(len(part.data) for part in self._headers_buffer)
            if size > self.max_header_block:
                raise DenialOfServiceError(f"Header block over {self.max_header_block} bytes and not yet complete")
        return f


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
        self.control_frames = 0  # frames other than DATA queued so far (HboneConnection bounds their backlog)

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
                self.control_frames += 1

    def add_data(self, stream_id: int, data: bytes) -> None:
        """A DATA frame (no flags) for `data`, which `DataPath.send` has accounted for."""
        if self._conn._data_to_send:
            self._move_direct()
        n = len(data)
        header = _FRAME_HEADER.pack(n >> 8, n & 0xFF, _DATA_TYPE, 0, stream_id)
        if n > SMALL_FRAME:
            self.chunks.append(header)
            self.chunks.append(data)
        else:
            self.chunks.append(header + data)

    def _move_direct(self) -> None:
        # h2 writes its connection preamble straight into its own buffer; keep it first.
        if self._conn._data_to_send:
            self.chunks.append(self._conn.data_to_send())

    def take(self) -> list[bytes | memoryview]:
        if self._conn._data_to_send:
            self._move_direct()
        chunks, self.chunks = self.chunks, []
        return chunks


class DataPath:
    """h2's bookkeeping for plain DATA frames, done directly (point 4 above).

    `receive` and `send` return False when the case is not the plain one; the caller then hands the frame
    to h2 (`H2Connection._receive_frame`, `H2Connection.send_data`), which applies every rule itself."""

    def __init__(self, conn: H2Connection, outbox: Outbox) -> None:
        self._conn = conn
        self._outbox = outbox

    def receive(self, stream_id: int, data: bytes) -> bool:
        """Account for a received plain DATA frame on an open stream. Raises h2's FlowControlError when the
        peer overran a window, as h2's frame handling would (the caller then ends the connection)."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            return False
        connection_state = conn.state_machine.state
        machine = stream.state_machine
        state = machine.state
        if (
            (connection_state is not _CLIENT_OPEN and connection_state is not _SERVER_OPEN)
            or (state is not _OPEN and state is not _HALF_LOCAL)
            or not machine.headers_received
            or stream._expected_content_length is not None
        ):
            return False
        n = len(data)
        # WindowManager.window_consumed, twice, inline (same counters, same error)
        for window in (conn._inbound_flow_control_window_manager, stream._inbound_window_manager):
            window.current_window_size -= n
            if window.current_window_size < 0:
                raise FlowControlError("Flow control window shrunk below 0")
        stream._actual_content_length += n
        return True

    def room(self, stream_id: int) -> int:
        """Bytes one DATA frame on `stream_id` may carry now (both windows and the frame size)."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            return conn.local_flow_control_window(stream_id)  # h2 raises the right error
        return min(conn.outbound_flow_control_window, stream.outbound_flow_control_window,
                   conn.max_outbound_frame_size)  # fmt: skip

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue a DATA frame (no flags) that fits `room()`; False when h2 must do it."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            return False
        connection_state = conn.state_machine.state
        state = stream.state_machine.state
        if (connection_state is not _CLIENT_OPEN and connection_state is not _SERVER_OPEN) or (
            state is not _OPEN and state is not _HALF_REMOTE
        ):
            return False
        n = len(data)
        conn.outbound_flow_control_window -= n
        stream.outbound_flow_control_window -= n
        self._outbox.add_data(stream_id, data)
        return True


_HEADER_EVENTS = (RequestReceived, ResponseReceived, TrailersReceived, InformationalResponseReceived)


@dataclass(kw_only=True)
class StreamRejected(StreamReset):
    """We reset a stream for what the peer sent on it (point 6); `reason` says what."""

    reason: str = ""


class HboneH2Connection(H2Connection):
    """h2's connection with the stream errors of point 6 kept to their stream."""

    def __init__(self, config: H2Configuration) -> None:
        # h2 validates a header block in the middle of handling its frame, where any error ends the connection;
        # we run the same validation once h2 has taken the frame, where a failure can cost only the stream.
        self._validate_inbound = config.validate_inbound_headers
        config = copy.copy(config)
        config.validate_inbound_headers = False
        super().__init__(config=config)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        sid = frame.stream_id
        try:
            frames, events = super()._receive_headers_frame(frame)
        except TooManyStreamsError as exc:  # raised before h2 changed anything
            return self._refuse_stream(frame, str(exc))
        if self._validate_inbound:
            for event in events:
                if isinstance(event, _HEADER_EVENTS):
                    # h2 decoded the block (the HPACK state is right) and moved the stream's state: a reset
                    # leaves the connection as if the peer had sent a good block and we had cancelled it.
                    try:
                        list(validate_headers(event.headers, self.streams[sid]._build_hdr_validation_flags([event])))
                    except ProtocolError as exc:
                        return frames, self._reject(sid, ErrorCodes.PROTOCOL_ERROR, f"malformed header block: {exc}")
                    break
        return frames, events

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Frame], list[Event]]:
        try:
            return super()._receive_data_frame(frame)
        except InvalidBodyLengthError as exc:
            # More (or, at END_STREAM, less) body than the stream's content-length said: a malformed message,
            # an error of this stream only (RFC 9113 §8.1.1). h2 raised after taking the frame (both windows,
            # the stream's state); its bytes will never be delivered, so their connection window goes back.
            sid = frame.stream_id
            events = self._reject(sid, ErrorCodes.PROTOCOL_ERROR, f"malformed body: {exc}")
            if frame.flow_controlled_length:
                self.acknowledge_received_data(frame.flow_controlled_length, sid)
            return [], events

    def _refuse_stream(self, frame: HeadersFrame, reason: str) -> tuple[list[Frame], list[Event]]:
        """A new stream over our limit, which h2 refused before even decoding its block. We do what h2 does
        for a stream it takes (decode the block into the connection's HPACK state; check the connection state
        and the stream id, whose errors stay connection errors; open the stream) and then reset it, so its
        id counts as used and later frames on it are handled as for any stream we reset."""
        _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        stream = self._begin_new_stream(frame.stream_id, AllowedStreamIDs(not self.config.client_side))
        stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
        return [], events + self._reject(frame.stream_id, ErrorCodes.REFUSED_STREAM, reason)

    def _reject(self, stream_id: int, code: ErrorCodes, reason: str) -> list[Event]:
        self.reset_stream(stream_id, code)
        return [StreamRejected(stream_id=stream_id, error_code=code, remote_reset=False, reason=reason)]


def make_connection(config: H2Configuration, on_goaway: Callable[[GoAwayFrame], None]) -> H2Connection:
    conn = HboneH2Connection(config)
    conn.encoder = PlainEncoder()
    fast = FastFrameBuffer(server=not conn.config.client_side, on_goaway=on_goaway)
    fast.max_frame_size = conn.incoming_buffer.max_frame_size
    conn.incoming_buffer = fast
    return conn


def install_outbox(conn: H2Connection) -> Outbox:
    outbox = Outbox(conn)
    conn._prepare_for_sending = outbox.prepare  # type: ignore[method-assign]
    return outbox
