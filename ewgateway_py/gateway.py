"""One outer stream, start to end: resolve its authority, choose a local endpoint, open TCP to that
endpoint's ztunnel, answer 200, relay the inner bytes unopened both ways, and record what happened.

The relayed bytes are the inner TLS session: nothing in them is parsed, logged or turned into labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from ewgateway_py.balancer import EndpointBalancer
from ewgateway_py.dispatch import Candidate, Destination, NoRoute, resolve
from ewgateway_py.peers import SourceLabeller, destination_peer
from hbone.errors import ConnectFailed
from hbone.relay import Relay
from hbone.server import ThrottledLog
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel
from mesh.daemon import DaemonContext
from mesh.metrics import TcpMetrics, TcpRecorder, TrafficLabels
from mesh.model import Service

log = logging.getLogger("ewgateway")

CONNECT_TIMEOUT = 10.0  # SPEC §3.4: connecting to the next hop gives up after 10 s
REPORTER = "destination"
MUTUAL_TLS = "mutual_tls"


class Gateway:
    """The HBONE server's stream handler; holds what outlives a stream (metrics, endpoint choice)."""

    def __init__(self, ctx: DaemonContext, balancer: EndpointBalancer | None = None) -> None:
        self.ctx = ctx
        self.metrics = TcpMetrics(ctx.registry)
        self.balancer = balancer or EndpointBalancer()
        self.sources = SourceLabeller(ctx.baggage_enabled, ctx.baggage_metrics)
        self._tasks: set[asyncio.Task[None]] = set()
        # A CONNECT costs its sender a few bytes: what it can make us log is rate-limited (each is counted).
        self._no_route_log = ThrottledLog(log, logging.INFO)
        self._connect_failed_log = ThrottledLog(log, logging.WARNING)

    def on_stream(self, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, tunnel: Tunnel) -> None:
        started = time.monotonic()
        state = self.ctx.watcher.state  # one snapshot per stream: a reload applies to the next stream
        identity = tunnel.connection.peer_identity
        source = self.sources.labels(identity, tunnel.header_values("baggage"))
        labels = TrafficLabels(REPORTER, source=source, connection_security_policy=MUTUAL_TLS)
        entry = _Entry(self.ctx, tunnel, labels, started)
        assert tunnel.target is not None  # the server parsed it before calling us
        try:
            destination = resolve(state, self.ctx.network, tunnel.target, tunnel.header("x-istio-source"))
        except NoRoute as exc:
            if exc.service is not None:
                entry.labels = _with_service(entry.labels, exc.service)
            self._no_route_log("503 for %s from %s (%s): %s", tunnel.target, entry.peer, identity, exc)
            entry.refuse(self.metrics, str(exc))
            return
        chosen = self.balancer.acquire(destination.candidates)
        try:
            await self._forward(entry, destination, chosen)
        finally:
            self.balancer.release(chosen)

    async def _forward(self, entry: _Entry, destination: Destination, chosen: Candidate) -> None:
        tunnel = entry.tunnel
        entry.labels = _with_service(entry.labels, destination.service).replace(
            destination=destination_peer(chosen.workload)
        )
        entry.chosen, entry.via_waypoint = chosen, destination.via_waypoint
        try:
            transport = await _connect(chosen.address)
        except ConnectFailed as exc:
            self.balancer.failed(chosen)
            self._connect_failed_log("503 for %s from %s (%s): %s; passing over %s for %gs", tunnel.target,
                                     entry.peer, tunnel.connection.peer_identity, exc, chosen.workload.uid,
                                     self.balancer.ejection)  # fmt: skip
            entry.refuse(self.metrics, str(exc), exc.flag)
            return
        self.balancer.succeeded(chosen)
        recorder = self.metrics.open(entry.labels)
        if tunnel.finished:  # the client gave up while we were connecting
            transport.close()
            entry.complete(recorder, None, "client went away before the upstream connection was ready")
            return
        tunnel.respond(200)
        # Side a is the client's tunnel: a→b is client→server ("received"), b→a "sent".
        relay = Relay()
        recorder.follow(relay.counts)
        try:
            result = await relay.start(tunnel, transport)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            relay.abort()
            entry.complete(recorder, relay, "gateway shut down")
            raise
        error = str(result.error) if result.error is not None else None
        entry.complete(recorder, relay, error)

    async def close(self) -> None:
        """Cut whatever streams are left (the server's drain deadline has passed by now)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {"openStreams": len(self._tasks), "endpoints": self.balancer.describe()}


class _Entry:
    """What is known about one stream so far, for its metrics and its access-log line."""

    def __init__(self, ctx: DaemonContext, tunnel: Tunnel, labels: TrafficLabels, started: float) -> None:
        self.ctx = ctx
        self.tunnel = tunnel
        self.labels = labels
        self.started = started
        self.peer = _address(tunnel.get_extra_info("peername"))
        self.chosen: Candidate | None = None
        self.via_waypoint = False

    def refuse(self, metrics: TcpMetrics, reason: str, flag: str = "CONNECT") -> None:
        """503, counted as an opened-and-failed connection, as ztunnel counts an inbound it cannot serve."""
        self.tunnel.respond(503)
        metrics.open(self.labels).close(flag)
        self._access_log(None, reason, flag)

    def complete(self, recorder: TcpRecorder, relay: Relay | None, error: str | None) -> None:
        recorder.close()
        self._access_log(relay, error, "-")

    def _access_log(self, relay: Relay | None, error: str | None, flag: str) -> None:
        s, d = self.labels.source, self.labels.destination
        chosen = self.chosen
        self.ctx.access_log.write({
            "src.addr": self.peer,
            "src.workload": s.workload,
            "src.namespace": s.namespace,
            "src.identity": s.principal,
            "dst.addr": _address(chosen.address) if chosen else None,
            "dst.service": self.labels.destination_service,
            "dst.workload": d.workload,
            "dst.namespace": d.namespace,
            "dst.identity": d.principal,
            "via": "waypoint" if self.via_waypoint else None,
            "direction": "inbound",
            "authority": str(self.tunnel.target) if self.tunnel.target else None,
            "bytes_sent": relay.b_to_a if relay else 0,  # toward the client, as ztunnel names them
            "bytes_recv": relay.a_to_b if relay else 0,
            "duration": f"{(time.monotonic() - self.started) * 1000:.0f}ms",
            "response_flags": flag,
            "error": error,
        }, message="connection failed" if flag != "-" else "connection complete")  # fmt: skip


def _with_service(labels: TrafficLabels, service: Service) -> TrafficLabels:
    return labels.replace(
        destination_service=service.hostname,
        destination_service_namespace=service.namespace,
        destination_service_name=service.name,
    )


async def _connect(address: tuple[str, int]) -> asyncio.Transport:
    host, port = address
    where = _address(address)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await asyncio.wait_for(loop.create_connection(Buffered, host, port), CONNECT_TIMEOUT)
    except TimeoutError as exc:
        raise ConnectFailed(f"connect to {where} timed out after {CONNECT_TIMEOUT:g}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {where} failed: {exc.strerror or exc}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport  # type: ignore[return-value]


def _address(addr: object) -> str | None:
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
