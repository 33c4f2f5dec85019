"""Opening an upstream stream to one endpoint: HBONE to a local endpoint's ztunnel (a CONNECT on a pooled
HBONE connection), double HBONE through a remote network's gateway, or plain TCP to a workload that is not in
the mesh; and learning the destination peer's labels on the way (SPEC §4.3, §5, §6). `upstream_pool` keeps
these streams for further requests to the same endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

from hbone.errors import HboneError
from hbone.identity import Identity
from hbone.tunnel import Tunnel
from mesh.metrics import BaggageMetrics, PeerLabels
from mesh.peers import peer_from_baggage
from mesh.routing import Hop, HopKind
from mesh.upstream import Connector
from waypoint_py.errors import UpstreamConnectFailed
from waypoint_py.streams import open_streams, open_tcp_streams

log = logging.getLogger("waypoint.upstream")

# TCP + TLS are bounded by hbone's own 10 s; this also bounds waiting for the CONNECT's answer.
CONNECT_DEADLINE = 15.0


@dataclass(slots=True)
class UpstreamStream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hop: Hop
    destination: PeerLabels
    address: str  # what we dialled, for the access log

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UpstreamDialer:
    def __init__(self, connector: Connector, identity: Identity, network: str, baggage_enabled: bool,
                 baggage_metrics: BaggageMetrics) -> None:  # fmt: skip
        self.connector = connector
        self.identity = identity
        self.network = network
        self.baggage_enabled = baggage_enabled
        self.baggage_metrics = baggage_metrics

    async def open(self, hop: Hop, own_baggage: str, forwarded_for: str) -> UpstreamStream:
        """A new stream to the hop's endpoint, or UpstreamConnectFailed saying what went wrong where."""
        try:
            async with asyncio.timeout(CONNECT_DEADLINE):
                return await self._open(hop, own_baggage, forwarded_for)
        except TimeoutError as exc:
            raise UpstreamConnectFailed(f"no answer from {_address(hop.address)} within {CONNECT_DEADLINE:g}s") from exc
        except HboneError as exc:
            raise UpstreamConnectFailed(f"{_address(hop.address)}: {exc}") from exc
        except OSError as exc:
            raise UpstreamConnectFailed(f"{_address(hop.address)}: {exc.strerror or exc}") from exc

    async def _open(self, hop: Hop, own_baggage: str, forwarded_for: str) -> UpstreamStream:
        if hop.kind is HopKind.TCP:
            reader, writer = await open_tcp_streams(*hop.address)
            labels = (PeerLabels.of_workload(hop.workload, principal=hop.workload.identity)
                      if hop.workload is not None else PeerLabels())  # fmt: skip
            return UpstreamStream(reader, writer, hop, labels, _address(hop.address))
        # One trace id per connection attempt, on the outer and the inner CONNECT alike (SPEC §3.3).
        trace = traceparent()
        headers = self._headers(hop, own_baggage, forwarded_for, trace)
        if hop.kind is HopKind.HBONE:
            tunnel = await self.connector.connect(self.identity, hop.expected, hop.address, hop.authority, headers)
            where = _address(hop.address)
        elif hop.kind is HopKind.DOUBLE_HBONE:
            # The gateway must not send us back to a waypoint: we are the waypoint (SPEC §5).
            outer = [*headers, ("x-istio-source", "waypoint")]
            inner = [*headers, ("x-forwarded-network", self.network)]
            tunnel = await self.connector.connect_double(self.identity, hop.expected, hop.address, hop.authority,
                                                         outer, hop.inner_expected, inner)  # fmt: skip
            where = f"{hop.authority} via {_address(hop.address)}"
        else:
            raise UpstreamConnectFailed(f"cannot forward to {_address(hop.address)}: not a mesh destination")
        try:
            labels = self._destination(hop, tunnel)
            reader, writer = open_streams(tunnel)
        except BaseException:
            with contextlib.suppress(Exception):
                tunnel.abort()
            raise
        return UpstreamStream(reader, writer, hop, labels, where)

    def _headers(self, hop: Hop, own_baggage: str, forwarded_for: str, trace: str) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        if self.baggage_enabled and own_baggage:
            # Ours, never the client's: the destination sees the waypoint as its source (SPEC §4.3).
            headers.append(("baggage", own_baggage))
        forwarded = f'for="{forwarded_for}"' if forwarded_for else ""
        if hop.service is not None:
            forwarded = f"{forwarded};host={hop.service.hostname}" if forwarded else f"host={hop.service.hostname}"
        if forwarded:
            headers.append(("forwarded", forwarded))
        headers.append(("traceparent", trace))
        return headers

    def _destination(self, hop: Hop, tunnel: Tunnel) -> PeerLabels:
        """The destination peer: its response baggage with the flag on (the namespace always its verified
        identity's), else what the state knows of a local endpoint; a remote one stays unknown but for the
        identity its (inner) TLS proved."""
        principal = tunnel.connection.peer_identity
        if self.baggage_enabled:
            # No usable baggage (none, or refused whole): the state's labels apply, as without the flag.
            values = tunnel.header_values("baggage", response=True)
            described = peer_from_baggage(values, principal, self.baggage_metrics)
            if described is not None:
                return described
        if hop.kind is HopKind.HBONE and hop.workload is not None and hop.workload.network == self.network:
            return PeerLabels.of_workload(hop.workload, principal=principal)
        return PeerLabels(principal=str(principal) if principal else None)
