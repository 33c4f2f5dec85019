"""Inbound HBONE (SPEC §3.4): check a CONNECT for a local workload, authorize it, connect to the
application, answer 200 only once that connection is up, then relay."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from hbone.authority import format_authority
from hbone.identity import Identity
from hbone.relay import Relay
from hbone.server import ThrottledLog
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel
from mesh.authz import ConnectionInfo, decide
from mesh.metrics import NO_FLAGS, PeerLabels, TrafficLabels
from mesh.model import Service, Workload
from mesh.peers import peer_from_baggage
from ztunnel_py.headers import X_FORWARDED_NETWORK, parse_forwarded_host
from ztunnel_py.node import Node

log = logging.getLogger("ztunnel.inbound")


class Refused(Exception):
    def __init__(self, status: int, reason: str, flag: str = "CONNECT") -> None:
        super().__init__(reason)
        self.status = status
        self.flag = flag


@dataclass
class InboundCall:
    """What we learn about one inbound CONNECT, for the decision, the metrics and the log line."""

    tunnel: Tunnel
    local_ip: str
    peer: tuple[str, int]
    source_identity: Identity | None
    destination: Workload | None = None
    target_port: int = 0
    service: Service | None = None
    source_labels: PeerLabels | None = None
    from_gateway: bool = False


# Refusals are each in the access log; the warning about them is rate-limited, since a peer decides how often
# it is refused (a denied client retrying in a loop would otherwise fill the log).
REFUSAL_WARNING_INTERVAL = 10.0


class Inbound:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._refused_log = ThrottledLog(log, logging.WARNING, REFUSAL_WARNING_INTERVAL)

    def on_stream(self, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(tunnel))
        self.node.track(task)

    async def _serve(self, tunnel: Tunnel) -> None:
        node = self.node
        started = time.monotonic()
        sockname = tunnel.get_extra_info("sockname")
        peername = tunnel.get_extra_info("peername")
        call = InboundCall(tunnel, sockname[0], (peername[0], peername[1]), tunnel.connection.peer_identity)
        try:
            self._resolve(call)
            call.source_labels = self._source_labels(call)
            self._authorize(call)
        except Refused as exc:
            self._refuse(call, exc, started)
            return
        assert call.destination is not None
        recorder = node.tcp.open(self._labels(call))
        loop = asyncio.get_running_loop()
        try:
            app, _ = await asyncio.wait_for(
                loop.create_connection(Buffered, call.local_ip, call.target_port), node.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            reason = f"connect to application {call.local_ip}:{call.target_port} failed: {exc or 'timeout'}"
            recorder.close("CONNECT")
            self._refuse(call, Refused(503, reason, "CONNECT"), started, counted=True)
            return
        if tunnel.finished:
            # The client reset the stream (or lost its connection) while we dialled: nobody is left to talk to
            # the application, so let it go now rather than leave it waiting. The client ended it: no flag.
            app.close()
            recorder.close(NO_FLAGS)
            self._log(call, None, NO_FLAGS, 0, 0, started, "the client went away while the application was dialled")
            return
        headers = []
        if node.response_baggage:
            headers.append(("baggage", node.baggage_of(call.destination)))
        tunnel.respond(200, headers)

        relay = Relay()
        recorder.follow(relay.counts)
        result = await relay.start(tunnel, app)  # type: ignore[arg-type]
        recorder.close(NO_FLAGS)
        self._log(
            call, 200, NO_FLAGS, result.a_to_b, result.b_to_a, started, str(result.error) if result.error else None
        )

    # -- the checks of SPEC §3.4, in order -----------------------------------------------------------
    def _resolve(self, call: InboundCall) -> None:
        node, tunnel = self.node, call.tunnel
        target = tunnel.target
        assert target is not None  # the HBONE server answered 400 for a bad authority already
        dest = node.local_workload(call.local_ip)
        if dest is None:
            raise Refused(503, f"no local workload at {call.local_ip}")
        call.destination = dest
        if target.is_ip:
            # A workload with its own application tunnel gets any authority (as Istio's ztunnel does), and so
            # does a waypoint, which is addressed with the original destination.
            mismatch = target.host != call.local_ip and dest.application_tunnel is None
            if mismatch and not _is_waypoint_for(node, dest, target.host):
                raise Refused(400, f"authority {target} does not match the connection's destination {call.local_ip}")
            call.target_port = target.port
        else:
            service = node.state.service_by_hostname(target.host, dest.namespace)
            if service is None:
                raise Refused(503, f"unknown hostname {target.host}")
            mapping = dest.services.get(service.key, {})
            port = mapping.get(target.port) or service.ports.get(target.port)
            if not port or service.key not in dest.services:
                raise Refused(503, f"{dest.name} serves no port {target.port} of {service.hostname}")
            call.target_port = port
            call.service = service
        if call.target_port in node.own_ports:
            raise Refused(503, f"port {call.target_port} is one of ztunnel's own")
        if dest.application_tunnel is not None and dest.application_tunnel.port:
            # The application's tunnel listens on one port for every target (checked after the port above, and
            # then used for authorization, as in Istio).
            call.target_port = dest.application_tunnel.port
        if call.service is None:
            host = parse_forwarded_host(tunnel.header("forwarded"))
            if host:
                call.service = node.state.service_by_hostname(host, dest.namespace)
        network = tunnel.header(X_FORWARDED_NETWORK)
        call.from_gateway = network is not None and network.lower() != node.ctx.network.lower()

    def _source_labels(self, call: InboundCall) -> PeerLabels:
        """The source: by IP from the state unless it came through a gateway (that IP is the gateway's);
        request baggage fills in what the state does not know, when the baggage exchange is on (but never the
        namespace of an mTLS peer: that is its certificate's)."""
        node, principal = self.node, call.source_identity
        if not call.from_gateway:
            known = node.state.workload_by_address(node.ctx.network, call.peer[0])
            if known is not None and (principal is None or known.identity == principal):
                return PeerLabels.of_workload(known, principal=principal)
        if node.response_baggage:
            described = peer_from_baggage(call.tunnel.header_values("baggage"), principal, node.ctx.baggage_metrics)
            if described is not None:
                return described
        return PeerLabels(principal=str(principal) if principal else None)

    def _authorize(self, call: InboundCall) -> None:
        node = self.node
        assert call.destination is not None
        decision = decide(
            node.state.policies_for(call.destination),
            ConnectionInfo(call.source_identity, call.peer[0], call.local_ip, call.target_port),
        )
        for dry in decision.dry_run:
            log.info(
                "dry-run policy %s (%s) %s connection from %s to %s:%d",
                dry.policy,
                dry.action,
                "matches" if dry.matched else "does not match",
                call.source_identity,
                call.local_ip,
                call.target_port,
            )
        if not decision.allowed:
            raise Refused(401, f"denied by policy: {decision.reason}", "DENY")

    # -- results -------------------------------------------------------------------------------------
    def _refuse(self, call: InboundCall, exc: Refused, started: float, counted: bool = False) -> None:
        self._refused_log(
            "inbound CONNECT %s from %s (%s:%d) refused with %d: %s",
            call.tunnel.authority,
            call.source_identity,
            call.peer[0],
            call.peer[1],
            exc.status,
            exc,
        )
        call.tunnel.respond(exc.status)
        if not counted and exc.status != 400:
            self.node.tcp.open(self._labels(call)).close(exc.flag)
        self._log(call, exc.status, exc.flag, 0, 0, started, str(exc))

    def _labels(self, call: InboundCall) -> TrafficLabels:
        dest = call.destination
        service = call.service
        return TrafficLabels(
            reporter="destination",
            source=call.source_labels or PeerLabels(principal=str(call.source_identity or "") or None),
            destination=PeerLabels.of_workload(dest, principal=dest.identity) if dest else PeerLabels(),
            destination_service=service.hostname if service else None,
            destination_service_namespace=service.namespace if service else None,
            destination_service_name=service.name if service else None,
            connection_security_policy="mutual_tls",
        )

    def _log(
        self,
        call: InboundCall,
        status: int | None,  # None: the client went away before it was answered
        flags: str,
        received: int,
        sent: int,
        started: float,
        error: str | None,
    ) -> None:
        access = self.node.ctx.access_log
        if not access.enabled:
            return
        dest = call.destination
        access.write(
            {
                "direction": "inbound",
                "src.addr": format_authority(call.peer[0], call.peer[1]),
                "src.identity": str(call.source_identity) if call.source_identity else None,
                "src.workload": call.source_labels.workload if call.source_labels else None,
                "dst.addr": format_authority(call.local_ip, call.target_port) if call.target_port else call.local_ip,
                "dst.hbone_addr": call.tunnel.authority,
                "dst.service": call.service.hostname if call.service else None,
                "dst.workload": dest.name if dest else None,
                "dst.identity": str(dest.identity) if dest else None,
                "status": status,
                "bytes_recv": received,
                "bytes_sent": sent,
                "duration": f"{(time.monotonic() - started) * 1000:.1f}ms",
                "flags": flags,
                "error": error,
            }
        )


def _is_waypoint_for(node: Node, dest: Workload, target_ip: str) -> bool:
    """A waypoint is addressed with the original destination (a VIP or another pod's IP)."""
    info = node.state.service_by_vip(node.ctx.network, target_ip)
    candidates = [info.waypoint] if info is not None and info.waypoint else []
    target_w = node.state.workload_by_address(node.ctx.network, target_ip)
    if target_w is not None and target_w.waypoint:
        candidates.append(target_w.waypoint)
    return any(dest in node.state.gateway_workloads(gw) for gw in candidates)
