"""What both HTTP/1.1 sides (client connections and upstream streams) read off a head h11 has parsed."""

from __future__ import annotations

from waypoint_py.http_types import Headers

# A request or response head bigger than this is refused, also one that arrives whole in one read (h11 bounds
# only the part of an event still incomplete).
MAX_HEAD_BYTES = 64 * 1024


def scan(headers: Headers) -> tuple[int, bytes | None, bytes | None, bytes | None]:
    """One pass over a head's header lines: the bytes they take on the wire (name, ": ", value, CRLF each),
    then the values of Content-Length, Transfer-Encoding and Host (h11 has already checked that these agree
    or are single where it matters)."""
    size = 0
    length = encoding = host = None
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            encoding = value
        elif name == b"host":
            host = value
    return size, length, encoding, host
