"""When a route's retry policy asks for another attempt, and how long to wait first (Envoy's semantics)."""

from __future__ import annotations

import random

from mesh.model import RetryPolicy

DEFAULT_BACKOFF = 0.025
MAX_BACKOFF = 1.0
GATEWAY_ERRORS = frozenset({502, 503, 504})


def attempts(policy: RetryPolicy | None) -> int:
    """Total tries: the first one plus `attempts` retries (as Istio's `retries.attempts`)."""
    if policy is None or not policy.retry_on:
        return 1
    return 1 + policy.attempts


def on_status(policy: RetryPolicy | None, status: int) -> bool:
    if policy is None:
        return False
    for cond in policy.retry_on:
        if cond == "5xx" and 500 <= status <= 599:
            return True
        if cond == "gateway-error" and status in GATEWAY_ERRORS:
            return True
        if cond.isdigit() and int(cond) == status:
            return True
    return False


def on_connect_failure(policy: RetryPolicy | None) -> bool:
    return policy is not None and any(c in ("connect-failure", "5xx", "gateway-error") for c in policy.retry_on)


def on_reset(policy: RetryPolicy | None) -> bool:
    return policy is not None and any(c in ("reset", "5xx") for c in policy.retry_on)


def backoff(policy: RetryPolicy | None, retry_number: int) -> float:
    """Exponential from the policy's base interval, with jitter so retries of many clients spread out."""
    base = policy.backoff if policy is not None and policy.backoff else DEFAULT_BACKOFF
    ceiling = min(MAX_BACKOFF, base * (2**retry_number))
    return random.uniform(ceiling / 2, ceiling)
