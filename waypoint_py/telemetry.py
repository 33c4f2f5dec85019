"""Reporting one request: the Istio L7 metrics with reporter="waypoint" and an access-log line (SPEC §7).

This runs once per request, so it does the least it can: the metric children of a label set are looked up
once per (source, destination, service, protocol, flags, status) and kept, and the text access line is
assembled from pieces cached per client (source fields) and per upstream connection (destination fields),
in exactly the form `mesh.accesslog.format_text` gives.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from mesh.accesslog import ACCESS_LOGGER, NEEDS_QUOTES, AccessLog
from mesh.metrics import NO_FLAGS, HttpMetrics, PeerLabels, TrafficLabels, grpc_response_status
from mesh.model import Service

REPORTER = "waypoint"
SECURITY_POLICY = "mutual_tls"  # everything reaches the waypoint over HBONE
MESSAGE = "request complete"
CACHE_LIMIT = 4096  # entries per cache; past it the cache starts over (a bound, not an LRU)


@dataclass(slots=True)
class RequestReport:
    """What is known about a request by the time it ends; filled in as the request goes."""

    source: PeerLabels
    service: Service | None
    source_address: str
    method: str
    path: str
    authority: str
    http_protocol: str
    grpc: bool
    started: float
    destination: PeerLabels = field(default_factory=PeerLabels)
    route: str = ""
    upstream: str = ""
    attempts: int = 0
    response_code: int = 0
    grpc_status: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    flags: list[str] = field(default_factory=list)
    error: str = ""

    def flag(self, flag: str) -> None:
        if flag != NO_FLAGS and flag not in self.flags:
            self.flags.append(flag)

    @property
    def response_flags(self) -> str:
        return ",".join(self.flags) or NO_FLAGS


# `mesh.accesslog._text_value`, for strings: quoted (JSON) only when a value would break key=value splitting.


def _text(value: str) -> str:
    if not value or NEEDS_QUOTES.search(value) is not None or not value.isprintable():
        return json.dumps(value, ensure_ascii=False)
    return value


def _pairs(fields: tuple[tuple[str, Any], ...]) -> str:
    """` k=v` for each field that is not None (ints and bools as format_text writes them)."""
    out = []
    for k, v in fields:
        if v is None:
            continue
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, int):
            text = str(v)
        else:
            text = _text(str(v))
        out.append(f" {k}={text}")
    return "".join(out)


class RequestTelemetry:
    def __init__(self, registry: CollectorRegistry, access_log: AccessLog) -> None:
        self.http = HttpMetrics(registry)
        self.access_log = access_log
        self._children: dict[tuple[Any, ...], tuple[Any, Any, Any, Any]] = {}
        self._fast_text = access_log.format == "text"
        self._logger: logging.Logger = getattr(access_log, "_logger", None) or logging.getLogger(ACCESS_LOGGER)
        self._source_text: dict[tuple[Any, ...], str] = {}
        self._dest_text: dict[tuple[Any, ...], str] = {}
        self._small_text: dict[str, str] = {}
        self._second = -1
        self._second_text = ""

    def record(self, r: RequestReport, ended: float) -> None:
        duration_ms = max(0.0, (ended - r.started) * 1000.0)
        flags = r.response_flags
        self._metrics(r, flags, grpc_response_status(r.grpc, r.grpc_status), duration_ms)
        if not self._logger.isEnabledFor(logging.INFO):
            return  # nobody listens: no line is formatted
        if self._fast_text:
            self.access_log.write_line(self._line(r, flags, duration_ms))
        else:
            self.access_log.write(self._fields(r, flags, duration_ms), message=MESSAGE)

    # -- metrics -------------------------------------------------------------------------------------------
    def _metrics(self, r: RequestReport, flags: str, grpc_status: str, duration_ms: float) -> None:
        svc = r.service
        svc_key = (svc.hostname, svc.namespace, svc.name) if svc is not None else None
        key = (r.source, r.destination, svc_key, r.grpc, flags, r.response_code, grpc_status)
        children = self._children.get(key)
        if children is None:
            labels = TrafficLabels(
                reporter=REPORTER,
                source=r.source,
                destination=r.destination,
                destination_service=svc.hostname if svc else None,
                destination_service_namespace=svc.namespace if svc else None,
                destination_service_name=svc.name if svc else None,
                request_protocol="grpc" if r.grpc else "http",
                response_flags=flags,
                connection_security_policy=SECURITY_POLICY,
            )
            values = (*labels.values(), str(r.response_code), grpc_status)
            http = self.http
            children = (http.requests.labels(*values), http.duration.labels(*values),
                        http.request_bytes.labels(*values), http.response_bytes.labels(*values))  # fmt: skip
            if len(self._children) >= CACHE_LIMIT:
                self._children.clear()
            self._children[key] = children
        requests, duration, request_bytes, response_bytes = children
        requests.inc()
        duration.observe(duration_ms)
        request_bytes.observe(r.request_bytes)
        response_bytes.observe(r.response_bytes)

    # -- access log ----------------------------------------------------------------------------------------
    def _fields(self, r: RequestReport, flags: str, duration_ms: float) -> dict[str, object]:
        svc = r.service
        return {
            "src.addr": r.source_address,
            "src.workload": r.source.workload,
            "src.namespace": r.source.namespace,
            "src.identity": r.source.principal,
            "dst.service": svc.hostname if svc else None,
            "dst.addr": r.upstream or None,
            "dst.workload": r.destination.workload,
            "dst.namespace": r.destination.namespace,
            "dst.identity": r.destination.principal,
            "route": r.route or None,
            "protocol": r.http_protocol,
            "method": r.method,
            "authority": r.authority,
            "path": r.path,
            "response_code": r.response_code,
            "grpc_status": r.grpc_status,
            "response_flags": flags,
            "attempts": r.attempts,
            "bytes_recv": r.request_bytes,
            "bytes_sent": r.response_bytes,
            "duration": f"{duration_ms:.1f}ms",
            "error": r.error or None,
        }

    def _line(self, r: RequestReport, flags: str, duration_ms: float) -> str:
        """`format_text(MESSAGE, self._fields(...))`, built from cached pieces."""
        src = r.source
        key = (r.source_address, src)
        source = self._source_text.get(key)
        if source is None:
            source = _pairs((("src.addr", r.source_address), ("src.workload", src.workload),
                             ("src.namespace", src.namespace), ("src.identity", src.principal)))  # fmt: skip
            if len(self._source_text) >= CACHE_LIMIT:
                self._source_text.clear()
            self._source_text[key] = source
        svc = r.service
        hostname = svc.hostname if svc else None
        dst = r.destination
        dkey = (hostname, r.upstream, dst, r.route)
        dest = self._dest_text.get(dkey)
        if dest is None:
            dest = _pairs((("dst.service", hostname), ("dst.addr", r.upstream or None), ("dst.workload", dst.workload),
                           ("dst.namespace", dst.namespace), ("dst.identity", dst.principal),
                           ("route", r.route or None)))  # fmt: skip
            if len(self._dest_text) >= CACHE_LIMIT:
                self._dest_text.clear()
            self._dest_text[dkey] = dest
        small = self._small
        grpc = "" if r.grpc_status is None else f" grpc_status={_text(r.grpc_status)}"
        error = f" error={_text(r.error)}" if r.error else ""
        return (f"{self._timestamp()} info {ACCESS_LOGGER} {MESSAGE}{source}{dest} "
                f"protocol={small(r.http_protocol)} method={small(r.method)} authority={_text(r.authority)} "
                f"path={_text(r.path)} response_code={r.response_code}{grpc} response_flags={small(flags)} "
                f"attempts={r.attempts} bytes_recv={r.request_bytes} bytes_sent={r.response_bytes} "
                f"duration={duration_ms:.1f}ms{error}")  # fmt: skip

    def _small(self, value: str) -> str:
        """`_text` of a value from a small set (protocol, method, flags), remembered."""
        text = self._small_text.get(value)
        if text is None:
            text = _text(value)
            if len(self._small_text) < CACHE_LIMIT:
                self._small_text[value] = text
        return text

    def _timestamp(self) -> str:
        """`mesh.accesslog.timestamp()`: the date part is formatted once a second."""
        now = time.time()
        seconds = int(now)
        if seconds != self._second:
            self._second = seconds
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._second_text}.{int((now - seconds) * 1_000_000):06d}Z"
