"""One choice per outer stream: least connections among the candidates, ties in turn, and a short passive
ejection of an endpoint that just refused a connection.

Choosing per stream (not per pooled connection) is what spreads another network's load evenly: all the
streams of one client ztunnel arrive on a single HTTP/2 connection (SPEC §5, Beyond Istio).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ewgateway_py.dispatch import Candidate, CandidateKey
from mesh.loadbalance import LeastConnections

# How long an endpoint that failed a connect is passed over, so no client waits on a dead one repeatedly.
EJECTION_SECONDS = 10.0


class EndpointBalancer:
    def __init__(self, ejection: float = EJECTION_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ejection = ejection
        self._clock = clock
        self._connections: LeastConnections[CandidateKey] = LeastConnections()
        self._ejected_until: dict[CandidateKey, float] = {}

    def acquire(self, candidates: Sequence[Candidate]) -> Candidate:
        """Pick one and count it open; call `release` when its stream ends. `candidates` must not be empty."""
        now = self._clock()
        live = [c for c in candidates if not self._ejected(c.key, now)]
        # When every candidate has failed lately, trying one beats refusing outright: it may be back.
        pool = live or list(candidates)
        by_key = {c.key: c for c in pool}
        key = self._connections.acquire(list(by_key))
        assert key is not None
        return by_key[key]

    def release(self, candidate: Candidate) -> None:
        self._connections.dec(candidate.key)

    def failed(self, candidate: Candidate) -> None:
        self._ejected_until[candidate.key] = self._clock() + self.ejection

    def succeeded(self, candidate: Candidate) -> None:
        self._ejected_until.pop(candidate.key, None)

    def _ejected(self, key: CandidateKey, now: float) -> bool:
        until = self._ejected_until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._ejected_until[key]
            return False
        return True

    def describe(self) -> dict[str, Any]:
        """For /config_dump: which endpoints are ejected, and for how much longer."""
        now = self._clock()
        return {
            "ejectionSeconds": self.ejection,
            "ejected": [
                {"uid": key[0], "address": f"{key[1]}:{key[2]}", "remainingSeconds": round(until - now, 3)}
                for key, until in self._ejected_until.items()
                if until > now
            ],
        }
