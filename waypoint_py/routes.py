"""Which service and port one request goes to: the `routes:` of the mesh state (HTTPRoute-shaped), else
the original destination (SPEC §6)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.model import BackendRef, RouteRule, Service, Workload
from waypoint_py.destination import OriginalDestination
from waypoint_py.http_types import RequestHead
from waypoint_py.view import WaypointView


@dataclass(frozen=True, slots=True)
class RouteTarget:
    service: Service | None  # None: a pod addressed directly, with no route for it
    port: int
    rule: RouteRule | None = None
    route: str = ""  # namespace/name of the route that matched, for the access log
    workload: Workload | None = None
    ip: str = ""


class NoRoute(LookupError):
    """A route claims the request's host but no rule matches it (404), or its backend is unusable (500)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def decide(view: WaypointView, original: OriginalDestination, head: RequestHead,
           rng: random.Random | None = None) -> RouteTarget:  # fmt: skip
    hosts = {head.host}
    if original.service is not None:
        hosts.add(original.service.hostname)
    claimed_by: list[str] = []
    headers: dict[str, str] | None = None
    for route in view.state.routes:
        if not any(route.matches_host(h) for h in hosts):
            continue
        claimed_by.append(f"{route.namespace}/{route.name}")
        for rule in route.rules:
            if headers is None:
                headers = head.match_headers()
            if rule.matches_request(head.method, head.path, headers):
                backend = _pick_backend(rule.backend_refs, rng)
                if backend is None:
                    raise NoRoute(f"route {route.namespace}/{route.name}: every backend has weight 0", 500)
                service = view.service_named(backend.namespace, backend.name)
                if service is None:
                    # An invalid backend: Gateway API (and Istio) answer 500 for the requests it would get.
                    raise NoRoute(f"route {route.namespace}/{route.name}: backend service "
                                  f"{backend.namespace}/{backend.name} is not in the mesh state", 500)  # fmt: skip
                return RouteTarget(service, backend.port, rule, f"{route.namespace}/{route.name}")
    if claimed_by:
        raise NoRoute(f"no rule of route {', '.join(claimed_by)} matches {head.method} {head.path}")
    return RouteTarget(original.service, original.port, workload=original.workload, ip=original.ip)


def _pick_backend(backends: tuple[BackendRef, ...], rng: random.Random | None) -> BackendRef | None:
    weighted = [b for b in backends if b.weight > 0]
    if not weighted:
        return None
    if len(weighted) == 1:
        return weighted[0]
    return (rng or random).choices(weighted, weights=[b.weight for b in weighted])[0]
