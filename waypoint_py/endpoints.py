"""Choosing each request's endpoint (SPEC §6): the router's decision, with what does not change between
requests worked out once per mesh state.

For a service, `Router.route_service(from_waypoint=True)` filters the endpoints (`eligible`), picks one at
random weighted by capacity, and builds the hop to it; never to the service's own waypoint, whichever it is,
as Istio's waypoint sends its requests to the endpoints. Only the pick depends on the request, so the
eligible endpoints, their cumulative weights and the hop to each are kept per (service, port) until the
state changes, and each request draws from them exactly as `choose_endpoint` does. Anything else (a pod
addressed directly, no usable endpoint) asks the router every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate

from mesh.loadbalance import eligible
from mesh.model import Service
from mesh.routing import Hop, Router, RoutingError
from mesh.state import MeshState
from waypoint_py.routes import RouteTarget
from waypoint_py.view import WaypointView


@dataclass(frozen=True, slots=True)
class _Choice:
    hops: tuple[Hop | str, ...]  # the hop to each eligible endpoint, or why there is none (RoutingError)
    cum_weights: tuple[int, ...]


_ASK_ROUTER = object()


class EndpointChooser:
    def __init__(self, network: str, rng: random.Random | None = None) -> None:
        self.network = network
        self.rng = rng or random.Random()
        self._state: MeshState | None = None
        self._choices: dict[tuple[str, int], object] = {}

    def pick(self, view: WaypointView, target: RouteTarget) -> Hop:
        """The hop for one request; raises RoutingError as the router does."""
        service = target.service
        if service is not None and target.workload is None:
            if view.state is not self._state:
                self._state = view.state
                self._choices = {}
            key = (service.key, target.port)
            choice = self._choices.get(key)
            if choice is None:
                choice = self._choices[key] = self._build(view, service, target.port)
            if choice is not _ASK_ROUTER:
                assert isinstance(choice, _Choice)
                hop = self.rng.choices(choice.hops, cum_weights=choice.cum_weights)[0]
                if isinstance(hop, str):
                    raise RoutingError(hop)
                return hop
        router = Router(view.state, self.network, self.rng)
        if service is None or target.workload is not None:
            assert target.workload is not None
            return router.route_workload(view.workload, target.workload, target.ip, target.port,
                                         from_waypoint=True)  # fmt: skip
        return router.route_service(view.workload, service, target.port, from_waypoint=True)

    def _build(self, view: WaypointView, service: Service, port: int) -> object:
        state = view.state
        pool = eligible(state.endpoints(service, port), source=view.workload, network=self.network,
                        load_balancer=service.load_balancer)  # fmt: skip
        weights = [ep.workload.capacity for ep in pool]
        if not pool or sum(weights) <= 0:
            return _ASK_ROUTER  # the router says why
        router = Router(state, self.network)
        hops: list[Hop | str] = []
        for ep in pool:
            try:
                hops.append(router.to_endpoint(ep.workload, ep.port, service, port))
            except RoutingError as exc:
                hops.append(str(exc))
        return _Choice(tuple(hops), tuple(accumulate(weights)))
