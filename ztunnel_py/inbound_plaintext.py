"""Inbound plaintext capture on 15006 (SPEC §2): connections redirected to a local workload without mTLS.
No identity, so authorization sees none, and metrics say connection_security_policy="unknown"."""

from __future__ import annotations

import asyncio
import logging
import time

from hbone.authority import format_authority
from hbone.relay import Relay
from hbone.server import ThrottledLog
from hbone.tlslayer import Buffered
from mesh.authz import ConnectionInfo, decide
from mesh.metrics import NO_FLAGS, PeerLabels, TrafficLabels
from ztunnel_py.node import Node
from ztunnel_py.original_dst import original_destination

log = logging.getLogger("ztunnel.inbound_plaintext")


class PlaintextProtocol(Buffered):
    def __init__(self, node: Node, refused_log: ThrottledLog) -> None:
        super().__init__()
        self._node = node
        self._refused_log = refused_log  # the listener's: a connection costs its sender nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        task = asyncio.get_running_loop().create_task(self._serve(transport))  # type: ignore[arg-type]
        self._node.track(task)

    async def _serve(self, transport: asyncio.Transport) -> None:
        try:
            await self._proxy(transport)
        finally:
            transport.close()  # on every path, even one we did not foresee: each connection holds a descriptor

    async def _proxy(self, transport: asyncio.Transport) -> None:
        node = self._node
        started = time.monotonic()
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if peer is None or sock is None:
            return  # uvloop has no address for a client that reset the connection at once: it is gone already
        dst = original_destination(sock)
        dest = node.local_workload(dst[0]) if dst else None
        if dst is None or dest is None or dst[1] in node.own_ports:
            self._refused_log(
                "plaintext inbound from %s:%d refused: original destination %s is not a local workload port",
                peer[0],
                peer[1],
                dst,
            )
            return
        source = node.state.workload_by_address(node.ctx.network, peer[0])
        labels = TrafficLabels(
            reporter="destination",
            source=PeerLabels.of_workload(source) if source else PeerLabels(),
            destination=PeerLabels.of_workload(dest, principal=dest.identity),
            connection_security_policy="unknown",
        )
        decision = decide(node.state.policies_for(dest), ConnectionInfo(None, peer[0], dst[0], dst[1]))
        if not decision.allowed:
            self._refused_log("plaintext inbound from %s to %s:%d denied: %s", peer[0], dst[0], dst[1], decision.reason)
            node.tcp.open(labels).close("DENY")
            return
        recorder = node.tcp.open(labels)
        loop = asyncio.get_running_loop()
        try:
            app, _ = await asyncio.wait_for(loop.create_connection(Buffered, dst[0], dst[1]), node.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self._refused_log("plaintext inbound to %s:%d: connect failed: %s", dst[0], dst[1], exc)
            recorder.close("CONNECT")
            return

        transport.resume_reading()
        relay = Relay()
        recorder.follow(relay.counts)
        result = await relay.start(transport, app)  # type: ignore[arg-type]
        recorder.close(NO_FLAGS)
        if node.ctx.access_log.enabled:
            node.ctx.access_log.write(
                {
                    "direction": "inbound-plaintext",
                    "src.addr": format_authority(peer[0], peer[1]),
                    "dst.addr": format_authority(dst[0], dst[1]),
                    "dst.workload": dest.name,
                    "bytes_recv": result.a_to_b,
                    "bytes_sent": result.b_to_a,
                    "duration": f"{(time.monotonic() - started) * 1000:.1f}ms",
                }
            )
