"""The HBONE listener: accept TCP, pick the certificate for the address that was dialled, mTLS, HTTP/2.

The server presents the identity of whoever it serves at that address (SPEC §3.1), so the TLS context is
chosen per accepted connection from its local address, not once per listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from .authority import BadAuthority, parse_authority
from .connection import H2Settings, HboneConnection, StreamHandler
from .errors import HboneError
from .identity import Identity
from .tls import check_client, describe_ssl_error, session_not_after
from .tlslayer import Buffered, attach, wrap_tls
from .tunnel import Tunnel

log = logging.getLogger("hbone.server")


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """What the server presents at one address: its TLS context and the identity in it."""

    context: ssl.SSLContext
    identity: Identity


# Given the local (ip, port) a client dialled, the identity to present there, or None to refuse.
IdentitySelector = Callable[[tuple[str, int]], ServerIdentity | None]
HandshakeFailureHook = Callable[[tuple[str, int], tuple[str, int], str], None]


class HboneServer:
    """Accepts HBONE connections on any number of listening addresses.

    A request that is not CONNECT, or whose authority is not `ip:port`/`host:port`, is answered 400 here;
    every well-formed CONNECT goes to `on_stream` with `tunnel.target` parsed, and must be answered there.
    """

    def __init__(
        self,
        select_identity: IdentitySelector,
        on_stream: StreamHandler,
        *,
        settings: H2Settings | None = None,
        name: str = "hbone",
        on_handshake_failure: HandshakeFailureHook | None = None,
    ) -> None:
        self.select_identity = select_identity
        self.on_stream = on_stream
        self.settings = settings or H2Settings()
        self.name = name
        self.on_handshake_failure = on_handshake_failure
        self.connections: set[HboneConnection] = set()
        self._listeners: list[Listener] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        # Anyone can connect and fail a handshake as often as they like: each is counted (the hook), the
        # warning is rate-limited.
        self._refused_log = ThrottledLog(log, logging.WARNING)

    async def listen(self, host: str, port: int) -> Listener:
        """Listen on host:port. Accepted sockets are wrapped in TLS before anything reads from them."""
        listener = Listener(self, host, port)
        self._listeners.append(listener)
        return listener

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for lst in self._listeners if not lst.closed for sock in lst.sockets]

    def _accepted(self, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            local = sock.getsockname()[:2]
            peer = sock.getpeername()[:2]
        except OSError:
            sock.close()
            return
        where = f"{peer[0]}:{peer[1]} -> {local[0]}:{local[1]}"
        chosen = self.select_identity(local)
        if chosen is None:
            log.info("%s: refused HBONE connection %s: no workload served at that address", self.name, where)
            sock.close()
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        placeholder = Buffered()  # receives what arrives after the handshake, until HTTP/2 takes over
        tls: asyncio.Transport | None = None
        try:
            # Whatever the client sends before the TLS layer takes over stays in the raw placeholder, and
            # the TLS layer reads it first: no ClientHello is lost.
            raw, _ = await loop.connect_accepted_socket(Buffered, sock)
            tls, placeholder = await wrap_tls(raw, chosen.context, server_side=True,
                                              timeout=self.settings.handshake_timeout)
            client = check_client(tls.get_extra_info("ssl_object"), chosen.identity.trust_domain)
        except HboneError as exc:
            self._refuse(sock, local, peer, where, str(exc), tls)
            return
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
            self._refuse(sock, local, peer, where, describe_ssl_error(exc), tls)
            return
        conn = HboneConnection(
            client=False,
            settings=self.settings,
            on_stream=self._check_request,
            local_identity=chosen.identity,
            peer_identity=client.identity,
            name=where,
            not_after=session_not_after(chosen.context, client),
        )
        self.connections.add(conn)
        conn.closed.add_done_callback(lambda _: self.connections.discard(conn))
        attach(tls, placeholder, conn)
        log.debug("%s: HBONE connection %s from %s as %s", self.name, where, client.identity, chosen.identity)

    def _check_request(self, tunnel: Tunnel) -> None:
        if tunnel.method != "CONNECT":
            self._bad_request(tunnel, f"400, method {tunnel.method} is not CONNECT")
            return
        try:
            tunnel.target = parse_authority(tunnel.authority)
        except BadAuthority as exc:
            self._bad_request(tunnel, f"400, bad authority: {exc}")
            return
        self.on_stream(tunnel)

    def _bad_request(self, tunnel: Tunnel, why: str) -> None:
        # Like a malformed request, it costs the peer only its stream; and like one, it is logged at debug and
        # counted, so a peer sending them without end is cut instead of filling the log.
        tunnel.respond(400)
        tunnel.connection.count_rejected(tunnel.stream_id, why)

    def _refuse(
        self,
        sock: socket.socket,
        local: tuple[str, int],
        peer: tuple[str, int],
        where: str,
        reason: str,
        tls: asyncio.Transport | None,
    ) -> None:
        self._refused_log("%s: refused HBONE connection %s: %s", self.name, where, reason)
        if self.on_handshake_failure is not None:
            self.on_handshake_failure(local, peer, reason)
        if tls is not None:
            tls.abort()
        else:
            sock.close()

    async def shutdown(self, deadline: float) -> None:
        """Stop accepting, send GOAWAY everywhere, let streams finish up to `deadline` seconds."""
        for listener in self._listeners:
            listener.close()
        for task in list(self._handshakes):
            task.cancel()
        conns = list(self.connections)
        if conns:
            await asyncio.gather(*(c.shutdown(deadline) for c in conns), return_exceptions=True)


ACCEPT_RETRY = 0.1  # seconds between accept attempts after a failure, e.g. out of file descriptors
ACCEPT_WARNING_INTERVAL = 10.0  # at most one "accept failed" warning this often while the failure lasts


class Throttle:
    """Says when to log a failure that repeats at a high rate (accept retries ten times a second while out of
    file descriptors): the first at once, then at most one per `interval` with how many were held back.
    Time is an argument, so the rule is tested without waiting."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None
        self._held = 0

    def hit(self, now: float) -> int | None:
        """None: stay quiet this time. Otherwise log now; the number is how many were held back before it."""
        if self._last is not None and now - self._last < self.interval:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


class ThrottledLog:
    """A log line a peer can cause as often as it likes (a refused connection or stream): the first at once,
    then at most one per `interval`, saying how many like it were held back. The counts are per instance: give
    each listener or daemon its own."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._throttle = Throttle(interval)

    def __call__(self, msg: str, *args: object) -> None:
        held = self._throttle.hit(time.monotonic())
        if held is None:
            return
        if held:
            msg, args = f"{msg} (and %d more like it since the last such line)", (*args, held)
        self._logger.log(self._level, msg, *args)


class Listener:
    """The listening sockets for one address and their accept loops (the `asyncio.Server` part we need: close,
    sockets). `:port` (no host) listens on every interface, IPv4 and IPv6, as asyncio's servers do; an IPv6
    socket takes IPv6 only (IPV6_V6ONLY), so a client is always seen by its own address, never as
    ::ffff:a.b.c.d."""

    def __init__(self, server: HboneServer, host: str, port: int, backlog: int = 1024) -> None:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        self.sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):  # getaddrinfo may repeat an entry
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in self.sockets:
                sock.close()
            raise
        self.closed = False
        self._server = server
        self._accept_warnings = Throttle(ACCEPT_WARNING_INTERVAL)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept_loop(sock)) for sock in self.sockets]

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self.closed:
                    return
                held = self._accept_warnings.hit(loop.time())
                if held is not None:
                    more = f" ({held} more failures since the last warning)" if held else ""
                    log.warning("%s: accept failed: %s%s", self._server.name, exc, more)
                await asyncio.sleep(ACCEPT_RETRY)  # e.g. out of file descriptors: do not spin
                continue
            conn.setblocking(False)
            self._server._accepted(conn)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
