"""Metric labels for what the gateway relays, from what it can actually see.

The source is the OUTER peer: its mTLS identity is the only thing proven about it. The gateway never sees
the inner CONNECT (it is inside the inner TLS session), so nothing here is derived from relayed bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hbone import baggage
from hbone.identity import Identity
from mesh.metrics import BaggageMetrics, PeerLabels
from mesh.model import Workload
from mesh.state import MeshState


class SourceLabeller:
    """Labels of the outer peer.

    Workloads in the mesh state with the peer's identity win: the config is trusted, a header is not. Only
    for an identity the state does not know, and only with AMBIENT_ENABLE_BAGGAGE on, does the outer
    `baggage` fill the labels, parsed with bounds; even then the namespace is the certificate's, so a
    peer can describe itself but not claim to live somewhere else.
    """

    def __init__(self, baggage_enabled: bool, baggage_metrics: BaggageMetrics, cache_size: int = 4096) -> None:
        self.baggage_enabled = baggage_enabled
        self.baggage_metrics = baggage_metrics
        self.cache_size = cache_size
        # Per state snapshot: finding an identity's workloads is a scan, and every stream asks.
        self._state: MeshState | None = None
        self._known: dict[Identity, PeerLabels | None] = {}

    def labels(self, state: MeshState, identity: Identity | None, baggage_values: Sequence[bytes]) -> PeerLabels:
        if identity is None:  # the listener requires a client certificate; kept for type safety
            return PeerLabels()
        known = self._from_state(state, identity)
        if known is not None:
            return known
        if self.baggage_enabled and baggage_values:
            result = baggage.parse(baggage_values)
            self.baggage_metrics.record(result)
            if result.baggage != baggage.EMPTY:
                labels = PeerLabels.of_baggage(result.baggage, principal=identity)
                return dataclasses.replace(labels, namespace=identity.namespace)
        return PeerLabels(principal=str(identity))

    def _from_state(self, state: MeshState, identity: Identity) -> PeerLabels | None:
        if state is not self._state or len(self._known) >= self.cache_size:
            self._state, self._known = state, {}
        if identity not in self._known:
            workloads = state.workloads_with_identity(identity)
            self._known[identity] = _agreed(workloads, identity) if workloads else None
        return self._known[identity]


def _agreed(workloads: Sequence[Workload], identity: Identity) -> PeerLabels:
    """The labels every workload with this identity agrees on (replicas agree on all of them; two
    deployments sharing a service account only on what they have in common)."""
    first, *rest = (PeerLabels.of_workload(w, principal=identity) for w in workloads)
    if not rest:
        return first
    common: dict[str, str | None] = {}
    for f in dataclasses.fields(PeerLabels):
        value = getattr(first, f.name)
        if all(getattr(other, f.name) == value for other in rest):
            common[f.name] = value
    return PeerLabels(**common)


def destination_peer(workload: Workload) -> PeerLabels:
    """The endpoint (or waypoint) the stream was relayed to; its principal is its configured identity."""
    return PeerLabels.of_workload(workload, principal=workload.identity)
