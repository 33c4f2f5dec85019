"""Outbound: a captured connection from a local workload goes to its next hop (SPEC §3.3, §5).

Both capture paths (SOCKS5 on 15080 and SO_ORIGINAL_DST on 15001) end here with a client transport, the
source address and the destination the application asked for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hbone.errors import ConnectRefused, HboneError
from hbone.relay import Relay
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel
from mesh.metrics import NO_FLAGS, PeerLabels, TrafficLabels
from mesh.model import Service, Workload
from mesh.peers import peer_from_baggage
from mesh.routing import Hop, HopKind, RoutingError
from ztunnel_py.headers import X_FORWARDED_NETWORK, connect_headers
from ztunnel_py.node import Node

log = logging.getLogger("ztunnel.outbound")

# Called once the fate of the connection is known: (reply code for SOCKS5, or None on success).
Outcome = Callable[[int | None], None]

# SOCKS5 reply codes by failure, so `curl` says something useful.
SOCKS_NOT_ALLOWED, SOCKS_HOST_UNREACHABLE, SOCKS_REFUSED, SOCKS_GENERAL = 2, 4, 5, 1


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    client: tuple[str, int]  # the application's address (source IP identifies the workload in shared mode)
    host: str  # destination IP, or a hostname (SOCKS5 domain)
    port: int
    is_domain: bool
    via: str  # "socks5" or "capture"


class Outbound:
    def __init__(self, node: Node) -> None:
        self.node = node

    def start(
        self, transport: asyncio.Transport, placeholder: Buffered, request: OutboundRequest, outcome: Outcome
    ) -> None:
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._proxy(transport, placeholder, request, outcome))
        self.node.track(task)

    async def _proxy(
        self, transport: asyncio.Transport, placeholder: Buffered, request: OutboundRequest, outcome: Outcome
    ) -> None:
        node = self.node
        started = time.monotonic()
        source = node.source_workload(request.client[0])
        if source is None:
            log.warning(
                "refused outbound connection from %s to %s:%d: %s is not a workload on this node",
                request.client[0],
                request.host,
                request.port,
                request.client[0],
            )
            outcome(SOCKS_NOT_ALLOWED)
            transport.close()
            return
        if node.is_self_call(request.host, request.port):
            log.warning(
                "refused outbound connection from %s to %s:%d: a loop into ztunnel itself",
                source.name,
                request.host,
                request.port,
            )
            outcome(SOCKS_NOT_ALLOWED)
            transport.close()
            return
        router = node.router()
        try:
            if request.is_domain and not _is_ip(request.host):
                hop = router.route_hostname(source, request.host, request.port)
            else:
                hop = router.route(source, request.host, request.port)
        except RoutingError as exc:
            log.warning("no route from %s to %s:%d: %s", source.name, request.host, request.port, exc)
            # Opened carries no flag (as every other connection); closed and failed carry the reason.
            labels = self._labels(source, None, request, service=exc.service)
            node.tcp.open(labels).close(exc.flag)
            outcome(SOCKS_HOST_UNREACHABLE)
            transport.close()
            return

        provisional = hop.kind is HopKind.DOUBLE_HBONE
        recorder = node.tcp.open(self._labels(source, hop, request), provisional=provisional)
        try:
            upstream = await self._connect(source, hop, request)
        except (HboneError, OSError, TimeoutError) as exc:
            flag = exc.flag if isinstance(exc, HboneError) else "CONNECT"
            reason = str(exc) or exc.__class__.__name__
            log.warning("outbound %s -> %s failed: %s", source.name, _where(hop), reason)
            recorder.close(flag)
            node.access_log_outbound(source, hop, request, 0, 0, time.monotonic() - started, flag, reason)
            outcome(_socks_reply(flag, exc))
            transport.close()  # after the reply, so the client learns why
            return
        if provisional and isinstance(upstream, Tunnel):
            recorder.relabel(self._labels(source, hop, request, inner=upstream))
        outcome(None)

        relay = Relay()
        recorder.follow(relay.counts)
        transport.resume_reading()
        result = await relay.start(transport, upstream)
        flag = NO_FLAGS
        recorder.close(flag)
        node.access_log_outbound(
            source,
            hop,
            request,
            result.a_to_b,
            result.b_to_a,
            time.monotonic() - started,
            flag,
            str(result.error) if result.error else None,
        )

    async def _connect(self, source: Workload, hop: Hop, request: OutboundRequest) -> asyncio.Transport:
        node = self.node
        headers = connect_headers(node.baggage_of(source), request.client, hop.service_hostname)
        if hop.kind is HopKind.HBONE:
            return await asyncio.wait_for(
                node.ctx.connector.connect(
                    source.identity, hop.expected, hop.address, hop.authority, headers, request.client[0]
                ),
                node.connect_timeout * 2,
            )
        if hop.kind is HopKind.DOUBLE_HBONE:
            # The same headers (one traceparent per client connection), plus the source network on the inner.
            inner_headers = [*headers, (X_FORWARDED_NETWORK, node.ctx.network)]
            return await asyncio.wait_for(
                node.ctx.connector.connect_double(
                    source.identity,
                    hop.expected,
                    hop.address,
                    hop.authority,
                    headers,
                    hop.inner_expected,
                    inner_headers,
                    request.client[0],
                ),
                node.connect_timeout * 3,
            )
        loop = asyncio.get_running_loop()
        transport, _ = await asyncio.wait_for(
            loop.create_connection(Buffered, hop.address[0], hop.address[1]), node.connect_timeout
        )
        return transport  # type: ignore[return-value]

    def _labels(
        self,
        source: Workload,
        hop: Hop | None,
        request: OutboundRequest,
        *,
        inner: Tunnel | None = None,
        service: Service | None = None,
    ) -> TrafficLabels:
        mtls = hop is not None and hop.kind in (HopKind.HBONE, HopKind.DOUBLE_HBONE)
        src = PeerLabels.of_workload(source, principal=source.identity if mtls else None)
        dst = PeerLabels()
        if hop is not None:
            service = hop.service
        if hop is not None and hop.workload is not None:
            if hop.kind is HopKind.DOUBLE_HBONE:
                # The remote endpoint is known only through the inner CONNECT's answer: its verified
                # identity, and, when the destination sends it (AMBIENT_ENABLE_BAGGAGE), its baggage (but
                # never its namespace: that is the identity's).
                if inner is not None:
                    peer = inner.connection.peer_identity
                    values = inner.header_values("baggage", response=True)
                    described = peer_from_baggage(values, peer, self.node.ctx.baggage_metrics)
                    if described is not None:
                        dst = described
                    elif peer is not None:
                        dst = PeerLabels(principal=str(peer))
            else:
                dst = PeerLabels.of_workload(hop.workload, principal=hop.workload.identity)
        return TrafficLabels(
            reporter="source",
            source=src,
            destination=dst,
            destination_service=service.hostname if service else None,
            destination_service_namespace=service.namespace if service else None,
            destination_service_name=service.name if service else None,
            response_flags=NO_FLAGS,
            connection_security_policy="mutual_tls" if mtls else "unknown",
        )


def _socks_reply(flag: str, exc: Exception) -> int:
    if flag == "DENY":
        return SOCKS_NOT_ALLOWED
    # Refused: the next hop answered the CONNECT with an error, or nothing listens at a plain TCP destination.
    if isinstance(exc, ConnectRefused | ConnectionRefusedError):
        return SOCKS_REFUSED
    return SOCKS_HOST_UNREACHABLE


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _where(hop: Hop) -> str:
    target = f"{hop.address[0]}:{hop.address[1]}"
    if hop.kind is HopKind.DOUBLE_HBONE:
        return f"{hop.authority} via gateway {target}"
    if hop.authority:
        return f"{hop.authority} via {target}"
    return target
