"""The small HTTP/1.1 server behind the stats (15020), readiness (15021) and admin (15000) ports.

h11 owns the protocol rules; this module is the asyncio adapter plus a route table (path → method →
handler). It is built for probes, scrapes and an operator's curl, not for traffic: requests are bounded to
64 KiB, each request must arrive within a deadline, and a client that sends garbage loses its own
connection and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from prometheus_client import CollectorRegistry

from mesh.logs import LOG_LEVELS, set_log_level
from mesh.metrics import render

log = logging.getLogger("mesh.http")

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT = 30.0  # also the keep-alive idle limit: a quiet connection is closed after this
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
_REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Response | Awaitable[Response]]
Routes = Mapping[str, Mapping[str, Handler]]


class _Reject(Exception):
    """A request we answer with an error status and then drop the connection (its bytes can't be trusted)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def serve_http(
    host: str, port: int, routes: Routes, *, name: str = "http", request_timeout: float = REQUEST_TIMEOUT
) -> asyncio.Server:
    """Listen on host:port (host "" means every interface) and serve `routes` until the server is closed."""
    holder: list[asyncio.Server] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Idle keep-alive connections (a scraper's, say) are still open when the daemon exits and the loop
        # cancels them; nobody awaits this task, so ending quietly keeps asyncio from logging a traceback.
        with contextlib.suppress(asyncio.CancelledError):
            await _Connection(reader, writer, routes, name, request_timeout, holder).run()

    server = await asyncio.start_server(on_connection, host or None, port, reuse_address=True)
    holder.append(server)
    return server


class _Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        routes: Routes,
        name: str,
        timeout: float,
        server: list[asyncio.Server],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.routes = routes
        self.name = name
        self.timeout = timeout
        self.server = server
        # h11's own bound covers the request line and headers; the body is bounded below.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.peer = _peer_name(writer)
        self.head = False  # the request being answered is a HEAD: its response has no body

    async def run(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        request = await self._read_request()
                except TimeoutError:
                    # An idle keep-alive connection timing out is routine; a half-sent request is not.
                    if self.conn.their_state is not h11.IDLE:
                        log.info("%s %s: request incomplete after %.0fs, closing", self.name, self.peer, self.timeout)
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                await self._send(response)
                if self.conn.our_state is h11.MUST_CLOSE or not self._server_serving():
                    return
                self.conn.start_next_cycle()
        except _Reject as e:
            log.info("%s %s: %s, closing connection", self.name, self.peer, e.reason)
            await self._send_error(e.status, e.reason)
        except h11.RemoteProtocolError as e:
            log.info("%s %s: bad request (%s), closing connection", self.name, self.peer, e)
            status = 413 if e.error_status_hint == 431 else e.error_status_hint
            await self._send_error(status, "bad request")
        except h11.LocalProtocolError as e:
            # Our answer broke HTTP/1.1's rules: that connection cannot go on, every other one can.
            log.warning("%s %s: cannot send the response (%s), closing connection", self.name, self.peer, e)
        except (ConnectionError, TimeoutError):
            pass  # the peer went away mid-response; nothing to tell anyone
        finally:
            self.writer.close()

    def _server_serving(self) -> bool:
        return not self.server or self.server[0].is_serving()

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(MAX_REQUEST_BYTES)
            self.conn.receive_data(data)  # b"" tells h11 the peer closed

    async def _read_request(self) -> Request | None:
        self.head = False
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", error_status_hint=400)
        self.head = event.method == b"HEAD"  # exactly as h11 tells (methods are case-sensitive)
        headers: dict[str, str] = {}
        head_size = len(event.method) + len(event.target) + 12
        for name, value in event.headers:
            headers[name.decode("latin-1")] = value.decode("latin-1")
            head_size += len(name) + len(value) + 4
        # h11 bounds only a head that is still incomplete; one that arrives whole in a single read is
        # parsed at any size, so measure it here.
        if head_size > MAX_REQUEST_BYTES:
            raise _Reject(413, f"request head of about {head_size} bytes is over {MAX_REQUEST_BYTES}")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            # Refuse before reading: the body is never wanted, and the unread bytes mean the
            # connection cannot be reused.
            raise _Reject(413, f"request body of {length} bytes is over {MAX_REQUEST_BYTES}")
        if self.conn.client_is_waiting_for_100_continue:
            await self._write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_REQUEST_BYTES:
                    raise _Reject(413, f"request body over {MAX_REQUEST_BYTES} bytes")
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(part).__name__}", error_status_hint=400)
        target = urlsplit(event.target.decode("latin-1"))
        return Request(
            method=event.method.decode("latin-1").upper(),
            path=unquote(target.path) or "/",
            query=parse_qs(target.query, keep_blank_values=True),
            headers=headers,
            body=bytes(body),
        )

    async def _dispatch(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return Response.text(404, f"no such path: {request.path}\n")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")  # HEAD is GET without the body (RFC 9110 §9.3.2); _send leaves it out
        if handler is None:
            allow = ", ".join(sorted({*methods, "HEAD"} if "GET" in methods else methods))
            resp = Response.text(405, f"method {request.method} not allowed on {request.path}; use {allow}\n")
            resp.headers.append(("allow", allow))
            return resp
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception:
            log.exception("%s %s: %s %s failed", self.name, self.peer, request.method, request.path)
            return Response.text(500, "internal error\n")

    async def _send(self, response: Response, *, close: bool = False) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = _REASONS.get(response.status, b"")
        out = self.conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if response.body and not self.head:
            out += self.conn.send(h11.Data(data=response.body))
        out += self.conn.send(h11.EndOfMessage())
        await self._write(out)

    async def _send_error(self, status: int, reason: str) -> None:
        # Only possible while h11 still expects our response head; otherwise just drop the connection.
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, TimeoutError):
            await self._send(Response.text(status, reason + "\n"), close=True)
            await self._linger()

    async def _linger(self) -> None:
        # Closing a socket with unread input makes the kernel send RST, and the client may then lose our
        # error response before reading it. So: half-close, and swallow what the client still sends
        # (bounded in bytes and time) until it closes too.
        if not self.writer.can_write_eof():
            return
        self.writer.write_eof()
        discarded = 0
        async with asyncio.timeout(LINGER_SECONDS):
            while discarded < LINGER_BYTES:
                chunk = await self.reader.read(MAX_REQUEST_BYTES)
                if not chunk:
                    return
                discarded += len(chunk)

    async def _write(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


# --- route builders -------------------------------------------------------------------------------------


def stats_routes(registry: CollectorRegistry) -> dict[str, dict[str, Handler]]:
    """`/metrics` and Envoy's `/stats/prometheus`, so scrapers configured for either one work."""

    def metrics(request: Request) -> Response:
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(200, body, content_type)

    return {"/metrics": {"GET": metrics}, "/stats/prometheus": {"GET": metrics}}


class Readiness:
    """Names of start-up tasks still pending; the daemon is ready when none are."""

    def __init__(self, pending: Iterable[str] = ()) -> None:
        self.pending: set[str] = set(pending)

    def mark_pending(self, name: str) -> None:
        self.pending.add(name)

    def mark_ready(self, name: str) -> None:
        self.pending.discard(name)

    @property
    def is_ready(self) -> bool:
        return not self.pending


def readiness_routes(readiness: Readiness) -> dict[str, dict[str, Handler]]:
    def ready(_: Request) -> Response:
        if readiness.is_ready:
            return Response.text(200, "ready\n")
        return Response.text(500, f"not ready, pending: {', '.join(sorted(readiness.pending))}\n")

    return {"/healthz/ready": {"GET": ready}}


def admin_routes(
    config_dump: Callable[[], dict[str, Any]], quit: Callable[[], None]
) -> dict[str, dict[str, Handler]]:
    """Admin endpoints; serve them on localhost only, as they can stop the daemon and change logging."""
    root = logging.getLogger()
    startup_level = root.level  # what `level=reset` returns to

    def dump(_: Request) -> Response:
        body = json.dumps(config_dump(), indent=2, sort_keys=False, default=_json_default) + "\n"
        return Response(200, body.encode(), JSON)

    def quitquitquit(_: Request) -> Response:
        log.info("admin: /quitquitquit, draining")
        quit()
        return Response.text(200, "OK\n")

    def show_level() -> Response:
        return Response.text(200, f"current log level is {logging.getLevelName(root.level).lower()}\n")

    def get_logging(_: Request) -> Response:
        return show_level()

    def set_logging(request: Request) -> Response:
        level = request.param("level")
        if level is None:
            return show_level()
        name = level.strip().lower()
        if name == "reset":
            set_log_level(startup_level)
        elif name in LOG_LEVELS:
            set_log_level(LOG_LEVELS[name])
        else:
            usage = "use debug, info, warning, error or reset"
            return Response.text(400, f"unknown log level {level!r}: {usage}\n")
        log.warning("admin: log level set to %s", logging.getLevelName(root.level).lower())
        return show_level()

    routes: dict[str, dict[str, Handler]] = {
        "/config_dump": {"GET": dump},
        "/quitquitquit": {"POST": quitquitquit},
        "/logging": {"GET": get_logging, "POST": set_logging},
    }
    return {path: {method: _same_machine_only(h) for method, h in methods.items()} for path, methods in routes.items()}


def _same_machine_only(handler: Handler) -> Handler:
    """A web page in a browser on the same machine can reach a localhost port: by a form POST (it carries an
    `Origin`) or, after DNS rebinding, by a name that resolves to 127.0.0.1 (its `Host` is that name). Admin
    requests are taken only from clients that name the address itself (an IP or localhost) and no origin."""

    def guarded(request: Request) -> Response | Awaitable[Response]:
        if "origin" in request.headers:
            return Response.text(403, "admin endpoints take no cross-origin (browser) requests\n")
        if not _names_an_address(request.headers.get("host", "")):
            return Response.text(403, "admin endpoints answer only to Host: <ip>[:port] or localhost[:port]\n")
        return handler(request)

    return guarded


def _names_an_address(host: str) -> bool:
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _json_default(value: object) -> object:
    # config_dump callbacks hand over the daemon's own types; render them the way an operator reads them.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)  # paths, IP addresses, identities: their text form is what an operator expects
