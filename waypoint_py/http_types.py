"""One HTTP request as the proxy sees it, whichever protocol carried it, and the two sides it talks to.

Header names are lower-case bytes on both HTTP/1.1 (h11 lower-cases them) and HTTP/2 (lower-case on the
wire), and values stay bytes: the proxy forwards what it got without re-encoding it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Headers = list[tuple[bytes, bytes]]

# Headers about one connection (RFC 9110 §7.6.1), never forwarded. `expect` is answered here (we send the
# 100 Continue ourselves), and `host`/pseudo-headers are carried as the request's authority.
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer",
     b"expect", b"host", b"http2-settings"}
)  # fmt: skip


def end_to_end(headers: Headers, *, keep_te_trailers: bool = False) -> Headers:
    """Drop connection-specific headers, including those the `connection` header names.

    `te: trailers` is kept on HTTP/2 because gRPC needs it end to end (and HTTP/2 allows nothing else)."""
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    out: Headers = []
    for k, v in headers:
        if k.startswith(b":"):
            continue
        if k == b"te" and keep_te_trailers and v.strip().lower() == b"trailers":
            out.append((k, b"trailers"))
            continue
        if k in _CONNECTION_HEADERS or k in named:
            continue
        out.append((k, v))
    return out


def first(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def strip_port(authority: str) -> str:
    """`host:port` or `[v6]:port` → the host, lower-case."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0].lower()
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host.lower()
    return authority.lower()


@dataclass(slots=True)
class RequestHead:
    method: str
    path: str
    authority: str  # the Host header or :authority
    headers: Headers  # end-to-end only; content-length is kept
    has_body: bool
    scheme: str = "http"

    @property
    def host(self) -> str:
        return strip_port(self.authority)

    @property
    def is_grpc(self) -> bool:
        ctype = first(self.headers, b"content-type")
        return ctype is not None and ctype.lower().startswith(b"application/grpc")

    def match_headers(self) -> dict[str, str]:
        """Header values for route matching: names lower-case; the first of repeated headers wins."""
        out: dict[str, str] = {}
        for k, v in self.headers:
            out.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        return out


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers  # end-to-end only; content-length is kept


class Downstream(Protocol):
    """One request on a client connection, and the way back to that client."""

    head: RequestHead
    protocol: str  # "HTTP/1.1" or "HTTP/2"
    response_started: bool
    response_ended: bool  # the whole response was handed to the connection
    aborted: bool  # the response will not be completed (see `abort`)

    async def read_body(self) -> bytes | None:
        """The next chunk of the request body; None once it has ended. Raises DownstreamGone."""

    @property
    def request_trailers(self) -> Headers | None: ...

    async def start_response(self, head: ResponseHead, hold: bool = False) -> None:
        """With `hold` the head may wait to go out with what follows (until `flush` at the latest)."""

    async def send_body(self, data: bytes, hold: bool = False) -> None:
        """With `hold` a small chunk may wait to go out with what follows (until `flush` at the latest)."""

    async def flush(self) -> None:
        """Write whatever is held, with back-pressure from the client."""

    async def end_response(self, trailers: Headers | None = None) -> None: ...

    async def send_error(self, status: int, message: str) -> None:
        """A short text/plain answer; only before a response has started."""

    def abort(self) -> None:
        """The response cannot be completed: reset the stream (HTTP/2) or drop the connection (HTTP/1.1)."""

    @property
    def gone(self) -> bool:
        """The client gave up: it closed its connection (HTTP/1.1) or reset its stream (HTTP/2)."""

    def watch_gone(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the client gives up while it is set (at once if it already has); None stops
        watching."""


class Upstream(Protocol):
    """One request to one endpoint, over an upstream connection to it (new or kept, `upstream_pool`)."""

    async def send_head(self, head: RequestHead, end: bool = False) -> None:
        """The request head; with `end` (a request without a body) the end of the request as well."""

    async def send_body(self, data: bytes) -> None: ...

    async def end_body(self, trailers: Headers | None) -> None: ...

    async def response_head(self) -> ResponseHead:
        """The final response head (1xx are skipped). Raises UpstreamReset."""

    async def read_body(self) -> bytes | None: ...

    def body_ready(self) -> bool:
        """`read_body` would answer without waiting for the upstream."""

    @property
    def trailers(self) -> Headers | None: ...

    @property
    def nothing_received(self) -> bool:
        """No answer came back at all in this exchange."""

    def abort(self) -> None:
        """Cancel the exchange: reset the stream, or close a connection that carries one request at a time, so
        that it is never reused; whatever waits for the upstream ends at once with UpstreamReset."""
