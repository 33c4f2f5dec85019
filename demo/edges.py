"""Who talked to whom, from each daemon's point of view: read with PromQL from Prometheus, or, where no
Prometheus is installed, summed the same way from each daemon's /metrics."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from demo.prometheus import Prometheus
from topology.launch import Mesh

BY = ("daemon", "reporter", "source_workload", "source_cluster", "destination_workload", "destination_cluster")
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_BYTES = ("istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total")
HTTP_REQUESTS = "istio_requests_total"


@dataclass(frozen=True, slots=True)
class Edge:
    daemon: str  # which daemon reported it
    reporter: str
    source: str  # workload@cluster
    destination: str
    kind: str  # "tcp" connections or "http" requests
    count: int
    bytes: int

    @property
    def remote_unknown(self) -> bool:
        return self.source.startswith("unknown@") or self.destination.startswith("unknown@")


def _peer(workload: str, cluster: str) -> str:
    return f"{workload}@{cluster}"


def _edges(counts: dict[tuple[str, ...], float], sizes: dict[tuple[str, ...], float], kind: str) -> list[Edge]:
    out = []
    for key, value in counts.items():
        daemon, reporter, sw, sc, dw, dc = key
        out.append(Edge(daemon, reporter, _peer(sw, sc), _peer(dw, dc), kind, int(value), int(sizes.get(key, 0))))
    return out


async def from_prometheus(prom: Prometheus) -> list[Edge]:
    by = ", ".join(BY)
    counts: dict[str, dict[tuple[str, ...], float]] = {}
    for name, promql in {
        "tcp": f"sum by ({by}) ({TCP_OPENED})",
        "tcp_bytes": f"sum by ({by}) ({TCP_BYTES[0]}) + sum by ({by}) ({TCP_BYTES[1]})",
        "http": f"sum by ({by}) ({HTTP_REQUESTS})",
    }.items():
        rows = await prom.query(promql)
        counts[name] = {tuple(r["metric"].get(k, "") for k in BY): float(r["value"][1]) for r in rows}
    return _edges(counts["tcp"], counts["tcp_bytes"], "tcp") + _edges(counts["http"], {}, "http")


async def from_scrapes(mesh: Mesh) -> list[Edge]:
    tcp: dict[tuple[str, ...], float] = defaultdict(float)
    tcp_bytes: dict[tuple[str, ...], float] = defaultdict(float)
    http: dict[tuple[str, ...], float] = defaultdict(float)
    for daemon in sorted(mesh.scrape_targets()):
        text = await mesh.scrape(daemon)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                target = {TCP_OPENED: tcp, HTTP_REQUESTS: http}.get(s.name)
                if target is None and s.name in TCP_BYTES:
                    target = tcp_bytes
                if target is None:
                    continue
                labels = {**s.labels, "daemon": daemon}
                target[tuple(labels.get(k, "") for k in BY)] += s.value
    return _edges(tcp, tcp_bytes, "tcp") + _edges(http, {}, "http")


def render(edges: list[Edge], title: str, subtitle: str = "") -> str:
    """A readable table, grouped by the daemon that saw it."""
    rows = sorted((e for e in edges if e.count), key=lambda e: (e.daemon, e.kind, e.source, e.destination))
    head = ("seen by", "reporter", "source", "", "destination", "what", "count", "bytes")
    table = [head] + [
        (e.daemon, e.reporter, e.source, "->", e.destination, "requests" if e.kind == "http" else "connections",
         str(e.count), str(e.bytes) if e.kind == "tcp" else "")
        for e in rows
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [title, "=" * len(title)]
    if subtitle:
        lines.append(subtitle)
    for i, r in enumerate(table):
        lines.append(
            "  ".join(c.ljust(w) if j < 5 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    unknown = sum(1 for e in rows if e.remote_unknown)
    lines.append(f"{len(rows)} edges, {unknown} with an unknown peer")
    return "\n".join(lines)
