"""A peer's `baggage` turned into its metric labels (SPEC §4.2, §4.3), the one way every daemon does it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hbone.baggage import EMPTY, parse
from hbone.identity import Identity
from mesh.metrics import BaggageMetrics, PeerLabels

log = logging.getLogger("mesh.peers")


def peer_from_baggage(
    values: Sequence[str | bytes], identity: Identity | None, baggage_metrics: BaggageMetrics
) -> PeerLabels | None:
    """The labels a peer's `baggage` header lines describe, or None when there is no usable baggage.

    Parsed with bounds, and what the bounds drop is counted. None covers a missing header and one refused as
    a whole (not ASCII, over 8 KiB) or that names nothing we know: all count as absent, so the caller does
    what it does without baggage. The namespace is the verified identity's, never the baggage's: a peer may
    describe itself but not put its traffic in another namespace's series. A peer with no verified identity
    (`identity` None: no mTLS on that connection) has no usable baggage at all, whatever it sent (SPEC §4.2):
    it is neither parsed nor counted.
    """
    if not values or identity is None:
        return None
    result = parse(values)
    baggage_metrics.record(result)
    if result.dropped:
        # Debug only: a peer decides how often this happens, and the drop metric already counts it.
        log.debug("baggage from %s: %d item(s) dropped (%s)", identity, result.dropped, result.reason)
    if result.baggage == EMPTY:
        return None
    return PeerLabels.of_peer_baggage(result.baggage, identity)
