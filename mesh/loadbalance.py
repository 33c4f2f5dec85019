"""Choosing an endpoint for a connection or request (reference §3 `ProxyState::load_balance`, §7).

ztunnel and the waypoint pick one endpoint per connection/request, weighted by `capacity` (a split-horizon
workload stands for `capacity` remote endpoints, so weighting keeps the per-pod share even across networks).
The east-west gateway instead spreads outer streams by round-robin or least-connections (SPEC §5, Beyond
Istio), so one pooled outer connection cannot pin all of another network's load on one pod.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from mesh.model import (
    Endpoint,
    HealthPolicy,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    Workload,
)

H = TypeVar("H", bound=Hashable)

_RNG = random.Random()


def usable(workload: Workload, local_network: str) -> bool:
    """An address-less (split-horizon) workload is reachable only through its network's gateway."""
    if workload.workload_ips:
        return True
    return workload.network != local_network and workload.network_gateway is not None


def _same(scope: LoadBalancerScope, source: Workload | None, local_network: str, w: Workload) -> bool:
    if scope is LoadBalancerScope.NETWORK:
        return w.network == local_network
    if source is None:
        return False  # nothing to be near to
    if scope is LoadBalancerScope.REGION:
        return w.locality.region == source.locality.region
    if scope is LoadBalancerScope.ZONE:
        return w.locality.zone == source.locality.zone
    if scope is LoadBalancerScope.SUBZONE:
        return w.locality.subzone == source.locality.subzone
    if scope is LoadBalancerScope.NODE:
        return w.node == source.node
    return w.cluster_id == source.cluster_id


def rank(w: Workload, prefs: Sequence[LoadBalancerScope], source: Workload | None, local_network: str) -> int:
    """How many leading routing preferences `w` shares with the source; the first miss ends the count."""
    n = 0
    for scope in prefs:
        if not _same(scope, source, local_network, w):
            break
        n += 1
    return n


def eligible(
    endpoints: Sequence[Endpoint],
    *,
    source: Workload | None = None,
    network: str | None = None,
    load_balancer: LoadBalancer | None = None,
) -> list[Endpoint]:
    """The endpoints a choice may be made among: usable, healthy unless AllowAll, in the best locality tier.

    `network` is the chooser's network; it defaults to the source workload's (or "" without a source).
    """
    local_network = network if network is not None else (source.network if source is not None else "")
    allow_unhealthy = load_balancer is not None and load_balancer.health_policy is HealthPolicy.ALLOW_ALL
    out = [ep for ep in endpoints if usable(ep.workload, local_network) and (allow_unhealthy or ep.workload.healthy)]
    if load_balancer is None or not load_balancer.routing_preferences or not out:
        return out
    prefs = load_balancer.routing_preferences
    ranks = [rank(ep.workload, prefs, source, local_network) for ep in out]
    # Strict accepts only a full match; Standard and Failover take the nearest non-empty tier.
    best = len(prefs) if load_balancer.mode is LoadBalancerMode.STRICT else max(ranks)
    return [ep for ep, r in zip(out, ranks, strict=True) if r == best]


def choose_endpoint(
    endpoints: Sequence[Endpoint],
    *,
    source: Workload | None = None,
    network: str | None = None,
    load_balancer: LoadBalancer | None = None,
    rng: random.Random | None = None,
) -> Endpoint | None:
    """One endpoint from `eligible(...)`, at random weighted by capacity; None when nothing qualifies."""
    pool = eligible(endpoints, source=source, network=network, load_balancer=load_balancer)
    weights = [ep.workload.capacity for ep in pool]
    if not pool or sum(weights) <= 0:
        return None
    return (rng or _RNG).choices(pool, weights=weights)[0]


class LeastConnections(Generic[H]):
    """Picks the item with the fewest open connections; callers report opens and closes.

    Ties rotate so that equally loaded items share new connections instead of the first always winning.
    Items must be hashable and stable across config reloads (frozen Endpoints and Workloads are).
    """

    def __init__(self) -> None:
        self._active: dict[H, int] = {}
        self._rotation = 0

    def active(self, item: H) -> int:
        return self._active.get(item, 0)

    def inc(self, item: H) -> None:
        self._active[item] = self._active.get(item, 0) + 1

    def dec(self, item: H) -> None:
        count = self._active.get(item, 0) - 1
        if count > 0:
            self._active[item] = count
        else:
            self._active.pop(item, None)  # no entry for idle items, so the dict cannot grow without bound

    def pick(self, items: Sequence[H]) -> H | None:
        if not items:
            return None
        n = len(items)
        start = self._rotation % n
        self._rotation = (self._rotation + 1) % (1 << 32)
        best: H | None = None
        best_count = 0
        for i in range(n):
            item = items[(start + i) % n]
            count = self._active.get(item, 0)
            if best is None or count < best_count:
                best, best_count = item, count
        return best

    def acquire(self, items: Sequence[H]) -> H | None:
        """Pick and count it open in one step (no await in between, so no other task can race us)."""
        item = self.pick(items)
        if item is not None:
            self.inc(item)
        return item

    @contextmanager
    def track(self, item: H) -> Iterator[H]:
        """Count `item` open for the duration of a `with` block."""
        self.inc(item)
        try:
            yield item
        finally:
            self.dec(item)
