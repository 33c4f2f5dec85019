"""The `baggage` header that carries peer metadata on HBONE CONNECTs (SPEC §4.1-4.2).

Writing follows ztunnel 1.29: fixed key order, no spaces, empty items left out. Reading mirrors ztunnel's
naive split-on-`,`-then-`=` parser (not a W3C baggage parser), and then bounds what a peer can make us keep:
values end up as Prometheus label values, so a hostile peer must not be able to grow memory or metric
cardinality, nor smuggle quotes, backslashes or newlines into the text exposition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

# Istio's WorkloadType values, lowercased as ztunnel writes them into the key `k8s.<type>.name`.
WORKLOAD_TYPES: frozenset[str] = frozenset({"deployment", "cronjob", "pod", "job"})
DEFAULT_WORKLOAD_TYPE = "deployment"

# Beyond Istio: bounds on what a peer may send us.
MAX_HEADER_BYTES = 8 * 1024
MAX_VALUE_BYTES = 253  # a DNS name's length; every label we fill from baggage is a k8s name or version
_VALID_VALUE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_VALUE_BYTES}}}")

# Why items were dropped. A fixed few tokens, as callers use them as a metric label.
REASON_TOO_LARGE = "header_too_large"
REASON_NOT_ASCII = "not_ascii"
REASON_INVALID_VALUE = "invalid_value"

_CLUSTER = "k8s.cluster.name"
_NAMESPACE = "k8s.namespace.name"
_SERVICE_NAME = "service.name"
_SERVICE_VERSION = "service.version"
_REGION = "cloud.region"
_ZONE = "cloud.availability_zone"
_WORKLOAD_KEYS: dict[str, str] = {f"k8s.{kind}.name": kind for kind in sorted(WORKLOAD_TYPES)}

# Plain keys → Baggage field; the workload keys are handled apart because they also set the type.
_FIELD_OF_KEY: dict[str, str] = {
    _CLUSTER: "cluster_id",
    _NAMESPACE: "namespace",
    _SERVICE_NAME: "service_name",
    _SERVICE_VERSION: "service_version",
    _REGION: "region",
    _ZONE: "zone",
}


@dataclass(frozen=True, slots=True)
class Baggage:
    """One peer's metadata; None means absent (rendered as `unknown` in metric labels)."""

    cluster_id: str | None = None
    namespace: str | None = None
    workload_type: str | None = None
    workload_name: str | None = None
    service_name: str | None = None
    service_version: str | None = None
    region: str | None = None
    zone: str | None = None


EMPTY = Baggage()


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What a header gave us, how many items were refused and why (one of the REASON_* tokens, or "").

    A header refused as a whole (too large, not ASCII) counts as one drop.
    """

    baggage: Baggage
    dropped: int = 0
    reason: str = ""


def is_valid_value(value: str) -> bool:
    """True when `value` may be kept: what we accept from peers is also all we are willing to write."""
    return _VALID_VALUE.fullmatch(value) is not None


def _workload_type(b: Baggage) -> str | None:
    if b.workload_type is None or b.workload_type == "":
        return DEFAULT_WORKLOAD_TYPE
    kind = b.workload_type.lower()
    return kind if kind in WORKLOAD_TYPES else None


def encode(b: Baggage) -> str:
    """The header value for `b`.

    Items whose value a peer would refuse are left out rather than sent: a `,` or `=` in a value would
    otherwise corrupt the neighbouring items, and it keeps encode→parse an exact round trip.
    """
    kind = _workload_type(b)
    items = (
        (_CLUSTER, b.cluster_id),
        (_NAMESPACE, b.namespace),
        (f"k8s.{kind}.name" if kind else "", b.workload_name),
        (_SERVICE_NAME, b.service_name),
        (_SERVICE_VERSION, b.service_version),
        (_REGION, b.region),
        (_ZONE, b.zone),
    )
    return ",".join(f"{key}={value}" for key, value in items if key and value and is_valid_value(value))


def _decode_lines(values: Iterable[str | bytes]) -> tuple[list[str] | None, str]:
    """Header lines as text, or None with a reason when the whole header must count as absent."""
    lines: list[str] = []
    total = 0
    for value in values:
        # Count before decoding so an oversized header costs no more than MAX_HEADER_BYTES of work.
        total += len(value)
        if total > MAX_HEADER_BYTES:
            return None, REASON_TOO_LARGE
        if isinstance(value, bytes):
            try:
                lines.append(value.decode("ascii"))
            except UnicodeDecodeError:
                return None, REASON_NOT_ASCII
        else:
            if not value.isascii():
                return None, REASON_NOT_ASCII
            lines.append(value)
    return lines, ""


def parse(values: Iterable[str | bytes]) -> ParseResult:
    """Parse every `baggage` header line of one message; never raises."""
    lines, why = _decode_lines(values)
    if lines is None:
        return ParseResult(EMPTY, 1, why)
    fields: dict[str, str | None] = {}
    dropped = 0
    reason = ""
    for line in lines:
        for item in line.split(","):
            parts = item.split("=")
            if len(parts) < 2:
                continue
            # As ztunnel: the second part is the value, anything after a further `=` is lost.
            key, value = parts[0], parts[1]
            kind = _WORKLOAD_KEYS.get(key)
            field = _FIELD_OF_KEY.get(key)
            if kind is None and field is None:
                continue
            kept: str | None = value or None
            if kept is not None and not is_valid_value(kept):
                dropped += 1
                reason = REASON_INVALID_VALUE
                kept = None
            # Later duplicates win, even when they are empty or refused: that is what the peer said last.
            if kind is not None:
                fields["workload_name"] = kept
                fields["workload_type"] = kind if kept is not None else None
            else:
                assert field is not None
                fields[field] = kept
    return ParseResult(replace(EMPTY, **fields), dropped, reason)
