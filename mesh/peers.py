"""A peer's `baggage` turned into its metric labels (SPEC §4.2, §4.3), the one way every daemon does it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hbone.baggage import EMPTY, parse
from hbone.identity import Identity
from mesh.metrics import REASON_TOO_MANY_LABEL_SETS, BaggageMetrics, PeerLabels

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

    Beyond Istio, the number of label sets is bounded too, not only their size (`mesh.metrics.PeerLabelBudget`,
    held by `baggage_metrics`, so one per daemon for its whole run): an identity whose baggage has already
    described as many different label sets as one identity may, or any identity once the process has admitted
    all it keeps, gets its label sets seen before and no new one; a new one counts as absent (and as a drop,
    reason `too_many_label_sets`). Without this, a peer could add series to every traffic metric, for ever, with
    each new value it sends.
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
    labels = PeerLabels.of_peer_baggage(result.baggage, identity)
    budget = baggage_metrics.label_sets
    if budget.admit(identity, labels):
        return labels
    baggage_metrics.dropped(REASON_TOO_MANY_LABEL_SETS)
    if budget.first_refusal(identity):
        # Once per identity (once in all for identities with nothing admitted): the peer decides how often.
        log.warning(
            "baggage from %s describes a label set beyond the bound (%d per identity, %d in all, %d in use): "
            "such baggage counts as absent from now on, each time counted in "
            "istio_baggage_dropped_items_total{reason=%s}; logged once",
            identity, budget.per_identity, budget.in_all, len(budget), REASON_TOO_MANY_LABEL_SETS,
        )  # fmt: skip
    return None
