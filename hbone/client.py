"""Opening HBONE client connections: TCP (or an existing stream), then mTLS, then HTTP/2."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import ssl
from collections.abc import Iterable

from .connection import HANDSHAKE_TIMED_OUT, H2Settings, HboneConnection
from .errors import ConnectFailed, H2HandshakeFailure, HboneError, TlsFailure
from .identity import Identity
from .tls import check_server, describe_ssl_error, session_not_after
from .tlslayer import Buffered, attach, wrap_tls
from .tunnel import Tunnel

CONNECT_TIMEOUT = 10.0


def _handshake_failure(conn: HboneConnection, exc: Exception) -> Exception:
    """What to report for `exc`, met by a client connection before the server's SETTINGS came.

    In TLS 1.3 the server checks our certificate after our side of the handshake is done, so its refusal
    arrives as an alert on the first read, or as a bare close before any HTTP/2 byte."""
    if conn.close_reason == HANDSHAKE_TIMED_OUT:
        return H2HandshakeFailure("no HTTP/2 SETTINGS from the server in time")
    if isinstance(conn.lost_exc, ssl.SSLError):
        return TlsFailure(f"server refused the TLS session: {describe_ssl_error(conn.lost_exc)}")
    if not conn.received_any:
        return TlsFailure(
            "server closed the TLS session before HTTP/2 started (it refused our certificate or identity)"
        )
    if isinstance(exc, HboneError):
        return exc
    return H2HandshakeFailure(f"HTTP/2 handshake failed: {exc}")


def _settings_received(conn: HboneConnection) -> bool:
    """The server's SETTINGS came: from then on a failure is the connection's or a stream's, not the handshake's."""
    ready = conn.ready
    return ready.done() and not ready.cancelled() and ready.exception() is None


async def _h2_ready(conn: HboneConnection, timeout: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except TimeoutError as exc:
        conn.abort(HANDSHAKE_TIMED_OUT)
        raise H2HandshakeFailure("no HTTP/2 SETTINGS from the server in time") from exc
    except Exception as exc:
        conn.abort(f"HTTP/2 handshake failed: {exc}")
        failure = _handshake_failure(conn, exc)
        if failure is exc:
            raise
        raise failure from exc


async def client_over(
    transport: asyncio.Transport,
    context: ssl.SSLContext,
    expected: Iterable[Identity],
    *,
    local_identity: Identity | None = None,
    settings: H2Settings | None = None,
    name: str = "",
    timeout: float = CONNECT_TIMEOUT,
    close_when_idle: bool = False,
    wait_for_settings: bool = True,
) -> HboneConnection:
    """mTLS + HTTP/2 client over an already open transport (a TCP socket, or a CONNECT stream).

    With `wait_for_settings` False the connection is returned as soon as TLS is done, the server's identity
    checked and our preface sent: HTTP/2 lets a client send its first request before the server's SETTINGS
    arrive (RFC 9113 §3.4), which saves a round trip. A failure before those SETTINGS then shows on the first
    stream: open it with `open_first_stream`, which reports such a failure as the handshake's."""
    try:
        tls, placeholder = await wrap_tls(transport, context, server_side=False, timeout=timeout)
    except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
        transport.abort()
        raise TlsFailure(f"TLS handshake with {name or 'peer'} failed: {describe_ssl_error(exc)}") from exc
    refusal = getattr(tls, "lost_exc", None)
    if refusal is not None:
        # TLS 1.3: our side was done when the server's verdict on our certificate (an alert) came in.
        tls.abort()
        raise TlsFailure(f"{name or 'peer'}: server refused the TLS session: {describe_ssl_error(refusal)}")
    try:
        peer = check_server(tls.get_extra_info("ssl_object"), expected)
    except HboneError as exc:
        tls.abort()
        exc.args = (f"{name or 'peer'}: {exc}",)
        raise
    conn = HboneConnection(
        client=True,
        settings=settings,
        local_identity=local_identity,
        peer_identity=peer.identity,
        name=name,
        close_when_idle=close_when_idle,
        not_after=session_not_after(context, peer),
    )
    attach(tls, placeholder, conn)
    if wait_for_settings:
        await _h2_ready(conn, timeout)
    return conn


async def open_first_stream(
    conn: HboneConnection, authority: str, headers: list[tuple[str, str]] | None = None
) -> Tunnel:
    """`conn.open_stream` for a connection from `client_over(..., wait_for_settings=False)`: what goes wrong
    before the server's SETTINGS came (the server refusing our certificate, say) is reported as `_h2_ready`
    would have reported it."""
    try:
        return await conn.open_stream(authority, headers)
    except Exception as exc:
        if _settings_received(conn):
            raise
        failure = _handshake_failure(conn, exc)
        if failure is exc:
            raise
        raise failure from exc


async def dial(
    address: tuple[str, int],
    context: ssl.SSLContext,
    expected: Iterable[Identity],
    *,
    local_identity: Identity | None = None,
    settings: H2Settings | None = None,
    timeout: float = CONNECT_TIMEOUT,
    source_ip: str | None = None,
) -> HboneConnection:
    """Open a pooled-style HBONE connection to `address` (normally <ip>:15008)."""
    loop = asyncio.get_running_loop()
    host, port = address
    name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # The source workload's IP, so the peer sees who connects; only of the destination's family (a dual-stack
    # workload reaching an IPv6 pod from its IPv4 address would otherwise fail with EAFNOSUPPORT).
    local_addr = (source_ip, 0) if source_ip and _same_family(source_ip, host) else None
    try:
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(Buffered, host, port, local_addr=local_addr), timeout
            )
        except OSError as exc:
            if local_addr is None or exc.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL):
                raise
            # The source IP is not ours to bind here (e.g. another host's pod): go without it.
            transport, _ = await asyncio.wait_for(loop.create_connection(Buffered, host, port), timeout)
    except TimeoutError as exc:
        raise ConnectFailed(f"connect to {name} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {name} failed: {exc.strerror or exc}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return await client_over(
        transport,  # type: ignore[arg-type]
        context,
        expected,
        local_identity=local_identity,
        settings=settings,
        name=name,
        timeout=timeout,
    )


def _same_family(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a).version == ipaddress.ip_address(b).version
    except ValueError:
        return True  # a name: let the connect decide
