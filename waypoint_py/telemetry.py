"""Reporting one request: the Istio L7 metrics with reporter="waypoint" and an access-log line (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from mesh.accesslog import AccessLog
from mesh.metrics import NO_FLAGS, HttpMetrics, PeerLabels, TrafficLabels
from mesh.model import Service

REPORTER = "waypoint"
SECURITY_POLICY = "mutual_tls"  # everything reaches the waypoint over HBONE


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


class RequestTelemetry:
    def __init__(self, registry: CollectorRegistry, access_log: AccessLog) -> None:
        self.http = HttpMetrics(registry)
        self.access_log = access_log

    def record(self, r: RequestReport, ended: float) -> None:
        duration_ms = max(0.0, (ended - r.started) * 1000.0)
        svc = r.service
        labels = TrafficLabels(
            reporter=REPORTER,
            source=r.source,
            destination=r.destination,
            destination_service=svc.hostname if svc else None,
            destination_service_namespace=svc.namespace if svc else None,
            destination_service_name=svc.name if svc else None,
            request_protocol="grpc" if r.grpc else "http",
            response_flags=r.response_flags,
            connection_security_policy=SECURITY_POLICY,
        )
        grpc_status = (r.grpc_status or "") if r.grpc else None
        self.http.record(labels, r.response_code, grpc_status, duration_ms, r.request_bytes, r.response_bytes)
        self.access_log.write(
            {
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
                "response_flags": r.response_flags,
                "attempts": r.attempts,
                "bytes_recv": r.request_bytes,
                "bytes_sent": r.response_bytes,
                "duration": f"{duration_ms:.1f}ms",
                "error": r.error or None,
            },
            message="request complete",
        )
