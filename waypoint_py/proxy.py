"""The waypoint's parts, wired together: who it is, the current view of the mesh state, the inbound HBONE
handler, the per-request forwarder, the upstream dialer and its per-endpoint pool, and the telemetry."""

from __future__ import annotations

from typing import Any

from hbone.identity import Identity
from mesh.daemon import DaemonContext
from mesh.settings import WorkloadInfo
from waypoint_py.forward import Forwarder
from waypoint_py.inbound import Inbound
from waypoint_py.telemetry import RequestTelemetry
from waypoint_py.upstream_dial import UpstreamDialer
from waypoint_py.upstream_pool import UpstreamPool
from waypoint_py.view import WaypointView, build_view


class Waypoint:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        info: WorkloadInfo | None = ctx.settings.proxy_workload_info
        identity = ctx.proxy_identity()
        if info is None or identity is None:
            raise ValueError("PROXY_WORKLOAD_INFO (namespace/name/service-account) must name the waypoint's workload")
        self.info = info
        self.identity: Identity = identity
        self.network: str = ctx.network
        self.baggage_enabled = ctx.baggage_enabled
        self.baggage_metrics = ctx.baggage_metrics
        self.telemetry = RequestTelemetry(ctx.registry, ctx.access_log)
        self.dialer = UpstreamDialer(ctx.connector, identity, self.network, self.baggage_enabled, ctx.baggage_metrics)
        self.upstreams = UpstreamPool(self.dialer)
        self.forwarder = Forwarder(self)
        self.inbound = Inbound(self)
        self._view: WaypointView | None = None

    def view(self) -> WaypointView:
        """The view of the current state; rebuilt once after each reload (states are immutable)."""
        state = self.ctx.watcher.state
        if self._view is None or self._view.state is not state:
            self._view = build_view(state, self.info, self.network, self.ctx.cluster_id)
        return self._view

    def config_dump(self) -> dict[str, Any]:
        view = self.view()
        return {
            "waypoint": {
                "identity": str(self.identity),
                "workload": view.workload.uid if view.workload is not None else None,
                "baggage": view.baggage,
                "baggageEnabled": self.baggage_enabled,
                "openSessions": len(self.inbound.sessions),
                "upstream": {
                    "opened": self.upstreams.opened,
                    "idleHttp1": self.upstreams.idle_count(),
                    "http2": self.upstreams.h2_count(),
                },
            }
        }
