"""Outbound HBONE for the daemons that originate tunnels (ztunnel, waypoint): one pooled hop, or double
HBONE through a network's east-west gateway (SPEC §3.6, §5)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace

from hbone.client import client_over, dial, open_first_stream
from hbone.connection import H2Settings
from hbone.errors import HboneError
from hbone.identity import Identity
from hbone.pool import Pool, PoolKey
from hbone.tunnel import Tunnel
from mesh.credentials import TlsIdentities

log = logging.getLogger("mesh.upstream")

Headers = list[tuple[str, str]]


def h2_settings(settings: SimpleNamespace) -> H2Settings:
    """HTTP/2 parameters from the daemon settings (HTTP2_*, POOL_MAX_STREAMS_PER_CONNECTION)."""
    return H2Settings(
        stream_window=settings.http2_stream_window_size,
        connection_window=settings.http2_connection_window_size,
        frame_size=settings.http2_frame_size,
        client_max_streams=settings.pool_max_streams_per_connection,
    )


class Connector:
    def __init__(self, identities: TlsIdentities, h2: H2Settings, pool: Pool) -> None:
        self.identities = identities
        self.h2 = h2
        self.pool = pool

    async def connect(
        self,
        source: Identity,
        expected: Iterable[Identity],
        address: tuple[str, int],
        authority: str,
        headers: Headers,
        source_ip: str = "",
    ) -> Tunnel:
        """A CONNECT stream on a pooled connection to `address`, verifying the server is one of `expected`."""
        wanted = frozenset(expected)
        key = PoolKey(source, wanted, address, source_ip)
        ctx = self.identities.client(source)

        async def dialer():
            # From the workload's own IP where we can, so the destination can tell who the source is.
            return await dial(
                address, ctx, wanted, local_identity=source, settings=self.h2, source_ip=source_ip or None
            )

        return await self.pool.open_stream(key, dialer, authority, headers)

    async def connect_double(
        self,
        source: Identity,
        gateway_expected: Iterable[Identity],
        gateway_address: tuple[str, int],
        authority: str,
        outer_headers: Headers,
        inner_expected: Iterable[Identity],
        inner_headers: Headers,
        source_ip: str = "",
    ) -> Tunnel:
        """Double HBONE: a pooled outer CONNECT to the gateway, then a fresh inner mTLS + HTTP/2 session
        inside it (never pooled, so each connection may reach a different remote endpoint), verifying the
        service's identities end to end. The inner connection closes with its stream."""
        outer = await self.connect(source, gateway_expected, gateway_address, authority, outer_headers, source_ip)
        try:
            inner_conn = await client_over(
                outer,
                self.identities.client(source),
                inner_expected,
                local_identity=source,
                settings=self.h2,
                name=f"inner {authority} via {gateway_address[0]}:{gateway_address[1]}",
                close_when_idle=True,
                wait_for_settings=False,  # the CONNECT follows our preface at once: one round trip less
            )
        except HboneError:
            if not outer.finished:
                outer.abort()
            raise
        try:
            return await open_first_stream(inner_conn, authority, inner_headers)
        except BaseException:
            inner_conn.close("inner CONNECT failed")
            raise
