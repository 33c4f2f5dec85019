"""What the waypoint derives once from each loaded mesh state: its own workload and baggage, services by
name (for route backends), and the local workloads by identity (for source labels)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hbone.baggage import Baggage, encode
from hbone.identity import Identity
from mesh.model import Service, Workload
from mesh.settings import WorkloadInfo
from mesh.state import MeshState


@dataclass(frozen=True, slots=True)
class WaypointView:
    state: MeshState
    workload: Workload | None  # the waypoint itself, when the state lists it
    baggage: str  # our own peer metadata, for CONNECT requests and responses
    services_by_name: dict[tuple[str, str], Service] = field(default_factory=dict)  # (namespace, name)
    local_by_identity: dict[Identity, tuple[Workload, ...]] = field(default_factory=dict)

    def service_named(self, namespace: str, name: str) -> Service | None:
        return self.services_by_name.get((namespace, name))


def build_view(state: MeshState, info: WorkloadInfo, network: str, cluster_id: str) -> WaypointView:
    def local(w: Workload) -> bool:
        return w.network == network and w.cluster_id in ("", cluster_id)

    mine = state.workloads_for_proxy(info.namespace, info.name, info.service_account)
    workload = next((w for w in mine if local(w)), mine[0] if mine else None)
    if workload is not None:
        baggage = workload.baggage()
    else:
        # Not (yet) in the state: say at least who we are, as istiod-less Istio proxies do.
        baggage = Baggage(cluster_id=cluster_id or None, namespace=info.namespace, workload_type="deployment",
                          workload_name=info.name)  # fmt: skip
    by_name: dict[tuple[str, str], Service] = {}
    for s in state.services:
        by_name.setdefault((s.namespace, s.name), s)
    by_identity: dict[Identity, list[Workload]] = {}
    for w in state.workloads:
        if local(w):
            by_identity.setdefault(w.identity, []).append(w)
    return WaypointView(
        state=state,
        workload=workload,
        baggage=encode(baggage),
        services_by_name=by_name,
        local_by_identity={k: tuple(v) for k, v in by_identity.items()},
    )
