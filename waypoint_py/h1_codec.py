"""HTTP/1.1 message syntax (RFC 9112) for the waypoint's two sides: reading heads and bodies from an asyncio
stream, with the grammar and the bounds h11 applies (the waypoint used h11 before; this does the same work
with a fraction of the calls on the per-request path).

What is shared: an input buffer over a StreamReader (`Input`), the header-field grammar with obsolete line
folding, and message bodies framed by Content-Length, chunked coding (with trailers) or the end of the
stream (`BodyReader`). Errors are the caller's: `bad(message)` for malformed input, `lost(message)` when the
stream ends or breaks in the middle of a message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from waypoint_py.http_types import Headers

READ_SIZE = 256 * 1024
MAX_LINE = 64 * 1024  # a chunk-size or trailer line (h11 bounds every incomplete event so)
MAX_CONTENT_LENGTH_DIGITS = 20

TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
HEAD_END = re.compile(rb"\n\r?\n")
FIELD = re.compile(rb"(" + TOKEN + rb"):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
DIGITS = re.compile(rb"[0-9]+")

ErrorFactory = Callable[[str], Exception]

# Body framings.
LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2


class Input:
    """Bytes from a StreamReader, buffered for parsing."""

    __slots__ = ("bad", "buf", "eof", "lost", "reader", "received")

    def __init__(self, reader: asyncio.StreamReader, initial: bytes, bad: ErrorFactory, lost: ErrorFactory) -> None:
        self.reader = reader
        self.buf = initial
        self.eof = False
        self.received = 0  # bytes read from the stream (not counting `initial`)
        self.bad = bad
        self.lost = lost

    async def fill(self) -> bool:
        """Read more into the buffer; False at the end of the stream."""
        if self.eof:
            return False
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError) as exc:
            raise self.lost(f"connection lost: {exc}") from exc
        if not data:
            self.eof = True
            return False
        self.received += len(data)
        self.buf = self.buf + data if self.buf else data
        return True

    async def head(self, limit: int, too_big: Callable[[], Exception]) -> list[bytes] | None:
        """The lines of the next head (up to the blank line, line breaks removed); None when the stream ends
        before any byte of it. Raises `lost` for a stream that ends in the middle of one."""
        while True:
            match = HEAD_END.search(self.buf)
            if match is not None:
                if match.end() > limit:
                    raise too_big()
                block, self.buf = self.buf[: match.start()], self.buf[match.end() :]
                return [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]
            if len(self.buf) > limit:
                raise too_big()
            if not await self.fill():
                if self.buf:
                    raise self.lost("connection closed in the middle of a message head")
                return None

    async def line(self) -> bytes:
        """The next line, without its line break (chunked coding)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1 :]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) > MAX_LINE:
                raise self.bad("line too long in a chunked body")
            if not await self.fill():
                raise self.lost("connection closed in the middle of the body")

    def take(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes (the buffer itself when it all fits: no copy)."""
        buf = self.buf
        if len(buf) <= limit:
            self.buf = b""
            return buf
        self.buf = buf[limit:]
        return buf[:limit]


def parse_fields(lines: list[bytes], bad: ErrorFactory) -> Headers:
    """Header (or trailer) fields, names lower-case; obsolete line folding joins with a space."""
    headers: Headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise bad("continuation line at the start of the header fields")
            name, value = headers[-1]
            headers[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" \t"))
            continue
        match = FIELD.fullmatch(line)
        if match is None:
            raise bad(f"illegal header line {line[:60]!r}")
        headers.append((match.group(1).lower(), match.group(2)))
    return headers


def content_length(values: list[bytes], bad: ErrorFactory) -> int:
    """The one length a message's Content-Length fields agree on (a list of equal values is fine)."""
    lengths = {v.strip() for value in values for v in value.split(b",")}
    value = lengths.pop()
    if lengths:
        raise bad("conflicting Content-Length headers")
    if not DIGITS.fullmatch(value) or len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise bad("bad Content-Length")
    return int(value)


def comma_tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated values of every `name` field, lower-case (h11's get_comma_header)."""
    out = []
    for k, v in headers:
        if k == name:
            for token in v.lower().split(b","):
                token = token.strip()
                if token:
                    out.append(token)
    return out


class BodyReader:
    """One message body off an `Input`."""

    __slots__ = ("_chunk_end", "_left", "done", "framing", "inp", "trailer_limit", "trailers")

    def __init__(self, inp: Input, framing: int, length: int = 0, trailer_limit: int = 64 * 1024) -> None:
        self.inp = inp
        self.framing = framing
        self._left = length if framing == LENGTH else 0  # of the Content-Length, or of the current chunk
        self._chunk_end = False  # chunked: the line break after the current chunk's data is still to come
        self.trailer_limit = trailer_limit
        self.trailers: Headers | None = None
        self.done = framing == LENGTH and length == 0

    def ready(self) -> bool:
        """`read` would answer without waiting for the peer (False when unsure)."""
        if self.done:
            return True
        inp = self.inp
        if self.framing == CHUNKED:
            return self._left > 0 and bool(inp.buf)
        return bool(inp.buf) or inp.eof

    async def read(self) -> bytes | None:
        """The next piece of the body; None once it has ended."""
        if self.done:
            return None
        inp = self.inp
        if self.framing == LENGTH:
            if not inp.buf and not await inp.fill():
                raise inp.lost("connection closed in the middle of the body")
            data = inp.take(self._left)
            self._left -= len(data)
            self.done = self._left == 0
            return data
        if self.framing == UNTIL_CLOSE:
            if not inp.buf and not await inp.fill():
                self.done = True
                return None
            return inp.take(len(inp.buf))
        return await self._read_chunked()

    async def _read_chunked(self) -> bytes | None:
        inp = self.inp
        while True:
            if self._left:
                if not inp.buf and not await inp.fill():
                    raise inp.lost("connection closed in the middle of the body")
                data = inp.take(self._left)
                self._left -= len(data)
                self._chunk_end = self._left == 0
                return data
            line = await inp.line()
            if self._chunk_end:
                if line:
                    raise inp.bad("chunk data longer than its size")
                self._chunk_end = False
                continue
            match = CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise inp.bad(f"illegal chunk size line {line[:40]!r}")
            size = int(match.group(1), 16)
            if size:
                self._left = size
                continue
            lines = []
            total = 0
            while line := await inp.line():
                total += len(line)
                if total > self.trailer_limit:
                    raise inp.bad("trailers too big")
                lines.append(line)
            self.trailers = parse_fields(lines, inp.bad) or None
            self.done = True
            return None
