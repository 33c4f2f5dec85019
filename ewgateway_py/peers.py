"""Metric labels for what the gateway relays, from what it can actually see.

The source is the OUTER peer: its mTLS identity is the only thing proven about it. The gateway never sees
the inner CONNECT (it is inside the inner TLS session), so nothing here is derived from relayed bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from hbone.identity import Identity
from mesh.metrics import BaggageMetrics, PeerLabels
from mesh.model import Workload
from mesh.peers import peer_from_baggage


class SourceLabeller:
    """Labels of the outer peer.

    The outer peer always comes from another network: that is what a gateway is for. Its mTLS identity is
    all that is proven. The mesh state cannot say more: a service account can exist in several clusters, and
    the state only describes this network, so a lookup by identity would be a guess. With
    AMBIENT_ENABLE_BAGGAGE on, the outer `baggage` (which the source ztunnel or waypoint always sends)
    describes the peer, parsed with bounds; even then the namespace is the certificate's, so a peer can
    describe itself but not claim to live somewhere else. Without baggage only the principal is known.
    """

    def __init__(self, baggage_enabled: bool, baggage_metrics: BaggageMetrics) -> None:
        self.baggage_enabled = baggage_enabled
        self.baggage_metrics = baggage_metrics

    def labels(self, identity: Identity | None, baggage_values: Sequence[bytes]) -> PeerLabels:
        if identity is None:  # the listener requires a client certificate; kept for type safety
            return PeerLabels()
        if self.baggage_enabled:
            described = peer_from_baggage(baggage_values, identity, self.baggage_metrics)
            if described is not None:
                return described
        # Without baggage, a peer from another network is its verified identity and nothing more (SPEC §4.3:
        # its labels are `unknown`), as ztunnel and the waypoint report it.
        return PeerLabels(principal=str(identity))


def destination_peer(workload: Workload) -> PeerLabels:
    """The endpoint (or waypoint) the stream was relayed to; its principal is its configured identity."""
    return PeerLabels.of_workload(workload, principal=workload.identity)
