"""Istio's standard metrics (SPEC §7) on prometheus-client, one registry per daemon.

Every traffic metric shares one label set, built from `TrafficLabels`, so that a series in our output lines
up with the same series from Istio's ztunnel or waypoint.

TCP byte counts take the cheap path: a connection's `TcpRecorder` adds bytes to two plain integers, and
those are pushed into the Prometheus counters when the connection closes and whenever the registry is
scraped (a hook collector registered ahead of the counters flushes every live recorder). A scrape therefore
always sees exact totals, and the relay pays one integer add per chunk instead of a locked counter update.
The price: rendering must happen on the event-loop thread that owns the recorders, which the stats server
in `mesh.http_server` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # only for annotations: the label builders read attributes and import nothing at runtime
    from hbone.baggage import Baggage, ParseResult
    from hbone.identity import Identity
    from mesh.model import Workload

# Istio's proxies export no `*_created` series and dashboards written for them do not expect any. The switch
# is process-wide in prometheus-client and read at collect time, so setting it on import covers every
# registry we build.
disable_created_metrics()

UNKNOWN = "unknown"
NO_FLAGS = "-"

TRAFFIC_LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)
HTTP_LABEL_NAMES: tuple[str, ...] = (*TRAFFIC_LABEL_NAMES, "response_code", "grpc_response_status")

# Istio's default histogram buckets for the L7 metrics (milliseconds for duration; the same edges are used
# for the byte histograms, as SPEC §7 asks).
HTTP_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000,
    3600000,
)  # fmt: skip


CHILD_CACHE_LIMIT = 4096  # label sets remembered per metric family; forgotten all at once beyond that


def _v(value: str | None) -> str:
    # Istio renders a missing *or empty* value as the literal `unknown`, never as an empty label.
    return value if value else UNKNOWN


# gRPC's status codes, OK (0) to UNAUTHENTICATED (16): the only values `grpc_response_status` ever takes.
GRPC_STATUS_CODES: frozenset[str] = frozenset(str(code) for code in range(17))
GRPC_UNKNOWN = "2"  # what gRPC makes of a code it does not know


def grpc_response_status(grpc: bool, status: int | str | None) -> str:
    """The `grpc_response_status` label of a request.

    Empty for plain HTTP (Envoy does the same): Prometheus treats an empty label as absent, which is what "only
    present for gRPC" means to a query. For gRPC, the status, or `unknown` without one (no response, no
    trailers), as every missing value (SPEC §7). The waypoint bounds what an upstream sends to gRPC's codes where
    it reads it (`waypoint_py.forward`), so an upstream cannot mint a series per value.
    """
    if not grpc:
        return ""
    return _v(None if status is None else str(status))


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """What the metrics say about one end of a connection (source or destination)."""

    workload: str | None = None
    canonical_service: str | None = None
    canonical_revision: str | None = None
    namespace: str | None = None
    principal: str | None = None
    app: str | None = None
    version: str | None = None
    cluster: str | None = None
    region: str | None = None
    zone: str | None = None

    @classmethod
    def of_workload(cls, w: Workload, *, principal: Identity | str | None = None) -> PeerLabels:
        """Labels of a workload we know from the config.

        `principal` is the caller's call, as in ztunnel: a destination's comes from its configured
        identity, a source's only from an mTLS peer certificate (so plain TCP sources say `unknown`).
        """
        return cls(
            workload=w.workload_name,
            canonical_service=w.canonical_name,
            canonical_revision=w.canonical_revision,
            namespace=w.namespace,
            principal=str(principal) if principal else None,
            app=w.canonical_name,
            version=w.canonical_revision,
            cluster=w.cluster_id,
            region=w.locality.region,
            zone=w.locality.zone,
        )

    @classmethod
    def of_baggage(cls, b: Baggage, *, principal: Identity | str | None = None) -> PeerLabels:
        """Labels of a peer known only from its baggage. `app` is the workload name here, not the canonical
        service: ztunnel's derived labels have that asymmetry, and we match its output."""
        return cls(
            workload=b.workload_name,
            canonical_service=b.service_name,
            canonical_revision=b.service_version,
            namespace=b.namespace,
            principal=str(principal) if principal else None,
            app=b.workload_name,
            version=b.service_version,
            cluster=b.cluster_id,
            region=b.region,
            zone=b.zone,
        )

    @classmethod
    def of_peer_baggage(cls, b: Baggage, identity: Identity) -> PeerLabels:
        """Labels of an mTLS peer that describes itself with baggage: it may name its workload, service,
        cluster and locality, but its namespace is the one its certificate proves, never a claim (a peer in
        one namespace must not put its traffic in another's series). There is no form without `identity`:
        baggage is only taken from a peer that authenticated on that connection (SPEC §4.2)."""
        return dataclasses.replace(cls.of_baggage(b, principal=identity), namespace=identity.namespace)


_NO_PEER = PeerLabels()


@dataclass(frozen=True, slots=True)
class TrafficLabels:
    """The 27 common traffic labels (ztunnel's `CommonTrafficLabels`), shared by every traffic metric."""

    reporter: str
    source: PeerLabels = _NO_PEER
    destination: PeerLabels = _NO_PEER
    destination_service: str | None = None
    destination_service_namespace: str | None = None
    destination_service_name: str | None = None
    request_protocol: str = "tcp"
    response_flags: str = NO_FLAGS
    connection_security_policy: str = UNKNOWN

    def values(self) -> tuple[str, ...]:
        """Label values in `TRAFFIC_LABEL_NAMES` order, with `unknown` for anything missing."""
        s, d = self.source, self.destination
        return (
            _v(self.reporter),
            _v(s.workload),
            _v(s.canonical_service),
            _v(s.canonical_revision),
            _v(s.namespace),
            _v(s.principal),
            _v(s.app),
            _v(s.version),
            _v(s.cluster),
            _v(self.destination_service),
            _v(self.destination_service_namespace),
            _v(self.destination_service_name),
            _v(d.workload),
            _v(d.canonical_service),
            _v(d.canonical_revision),
            _v(d.namespace),
            _v(d.principal),
            _v(d.app),
            _v(d.version),
            _v(d.cluster),
            _v(self.request_protocol),
            _v(self.response_flags),
            _v(self.connection_security_policy),
            _v(s.region),
            _v(s.zone),
            _v(d.region),
            _v(d.zone),
        )

    def as_dict(self) -> dict[str, str]:
        return dict(zip(TRAFFIC_LABEL_NAMES, self.values(), strict=True))

    def replace(self, **changes: object) -> TrafficLabels:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def new_registry() -> CollectorRegistry:
    """A registry of its own for one daemon, so tests and co-hosted daemons never share series."""
    return CollectorRegistry(auto_describe=True)


class _FlushOnCollect(Collector):
    """Exports nothing; being registered before the TCP counters, it flushes live byte counts into them."""

    def __init__(self, tcp: TcpMetrics) -> None:
        self._tcp = tcp

    def describe(self) -> Iterable[Metric]:
        # An explicit empty describe keeps the registry from calling collect() (and flushing) at register.
        return ()

    def collect(self) -> Iterable[Metric]:
        self._tcp.flush()
        return ()


class TcpMetrics:
    """ztunnel's L4 metrics. Use `open()` once per proxied connection and keep the returned recorder."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._live: set[TcpRecorder] = set()
        # Registered first on purpose: the registry collects in registration order, so byte counts are
        # flushed before the counters below are read.
        registry.register(_FlushOnCollect(self))
        names = TRAFFIC_LABEL_NAMES
        self.opened = Counter(
            "istio_tcp_connections_opened", "Connections opened.", names, registry=registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "Connections closed.", names, registry=registry
        )
        self.received_bytes = Counter(
            "istio_tcp_received_bytes", "Bytes from client to server.", names, registry=registry
        )
        self.sent_bytes = Counter(
            "istio_tcp_sent_bytes", "Bytes from server to client.", names, registry=registry
        )
        self.failed = Counter(
            "istio_tcp_connections_failed",
            "Connections that ended with a response flag other than '-'.",
            names,
            registry=registry,
        )
        self.sockets_open = Gauge(
            "istio_tcp_sockets_open", "Proxied connections open now.", ("reporter",), registry=registry
        )
        # Children by label values: `labels()` with 27 values (validated, joined, looked up under a lock)
        # was a large share of a new connection's cost, and connections repeat the same few label sets.
        self._open_children: dict[tuple[str, ...], tuple[Counter, Counter, Counter]] = {}
        self._close_children: dict[tuple[str, ...], tuple[Counter, Counter | None]] = {}
        self._gauges: dict[str, Gauge] = {}

    def _children_of_open(self, values: tuple[str, ...]) -> tuple[Counter, Counter, Counter]:
        """(opened, received bytes, sent bytes) children for `values`."""
        children = self._open_children.get(values)
        if children is None:
            if len(self._open_children) >= CHILD_CACHE_LIMIT:
                self._open_children.clear()
            children = (self.opened.labels(*values), self.received_bytes.labels(*values),
                        self.sent_bytes.labels(*values))  # fmt: skip
            self._open_children[values] = children
        return children

    def _children_of_close(self, values: tuple[str, ...], failed: bool) -> tuple[Counter, Counter | None]:
        """(closed, failed or None) children for `values` (which include the response flags)."""
        children = self._close_children.get(values)
        if children is None:
            if len(self._close_children) >= CHILD_CACHE_LIMIT:
                self._close_children.clear()
            children = (self.closed.labels(*values), self.failed.labels(*values) if failed else None)
            self._close_children[values] = children
        return children

    def _gauge(self, reporter: str) -> Gauge:
        gauge = self._gauges.get(reporter)
        if gauge is None:
            gauge = self._gauges[reporter] = self.sockets_open.labels(reporter)
        return gauge

    def open(self, labels: TrafficLabels, *, provisional: bool = False) -> TcpRecorder:
        """Start recording a connection.

        With `provisional=True` the opened counter waits for `relabel()` (or `close()`), for connections
        whose destination labels are only learned later, e.g. from response baggage on double HBONE; this
        keeps opened, bytes and closed under one label set.
        """
        rec = TcpRecorder(self, labels)
        self._live.add(rec)
        rec._gauge.inc()
        if not provisional:
            rec._commit()
        return rec

    def flush(self) -> None:
        """Push the byte counts of every live connection into the counters."""
        # A copy, so a scrape from another thread (not ours, but possible) cannot trip over a close.
        for rec in tuple(self._live):
            rec.flush()

    @property
    def live(self) -> int:
        return len(self._live)


class TcpRecorder:
    """Metrics of one connection. Bytes come from `follow(relay.counts)` (read at each flush, nothing per chunk)
    or from `add_received`/`add_sent` (one integer add each)."""

    __slots__ = ("_closed", "_counted", "_follow", "_gauge", "_labels", "_metrics", "_rx", "_rx_counter", "_tx",
                 "_tx_counter", "_values")  # fmt: skip

    def __init__(self, metrics: TcpMetrics, labels: TrafficLabels) -> None:
        self._metrics = metrics
        self._labels = labels
        self._values: tuple[str, ...] | None = None  # set once the opened counter is incremented
        self._rx = 0
        self._tx = 0
        self._rx_counter: Counter | None = None
        self._tx_counter: Counter | None = None
        self._closed = False
        self._follow: list[int] | None = None
        self._counted = (0, 0)
        self._gauge = metrics._gauge(_v(labels.reporter))

    @property
    def labels(self) -> TrafficLabels:
        return self._labels

    @property
    def closed(self) -> bool:
        return self._closed

    def add_received(self, n: int) -> None:
        """Client→server bytes (for either reporter)."""
        self._rx += n

    def add_sent(self, n: int) -> None:
        """Server→client bytes (for either reporter)."""
        self._tx += n

    def follow(self, counts: list[int]) -> None:
        """Take byte counts from live counters [client→server, server→client] (a relay's `counts`), read at
        each flush, so the data path pays nothing per chunk."""
        self._follow = counts
        self._counted = (counts[0], counts[1])

    def relabel(self, labels: TrafficLabels) -> bool:
        """Replace the labels of a provisional recorder and count it as opened.

        Returns False (and changes nothing) once the recorder has been committed, because a counter cannot
        take back what it has already published.
        """
        if self._values is not None or self._closed:
            return False
        self._labels = labels
        self._commit()
        return True

    def _commit(self) -> None:
        values = self._labels.values()
        self._values = values
        # Bind the children once: later flushes are a single `.inc()` each, with no label lookup.
        opened, self._rx_counter, self._tx_counter = self._metrics._children_of_open(values)
        opened.inc()

    def flush(self) -> None:
        if self._rx_counter is None or self._tx_counter is None:
            return  # provisional: bytes wait until the labels are final
        if self._follow is not None:
            rx, tx = self._follow
            self._rx += rx - self._counted[0]
            self._tx += tx - self._counted[1]
            self._counted = (rx, tx)
        if self._rx:
            self._rx_counter.inc(self._rx)
            self._rx = 0
        if self._tx:
            self._tx_counter.inc(self._tx)
            self._tx = 0

    def close(self, response_flags: str = NO_FLAGS) -> None:
        """Record the end of the connection; safe to call more than once (only the first counts).

        Opened and byte series keep the labels of the open; closed (and failed, for any flag but `-`) carry
        the final `response_flags`, as ztunnel does.
        """
        if self._closed:
            return
        self._closed = True
        if self._values is None:
            self._commit()
        self.flush()
        m = self._metrics
        m._live.discard(self)
        self._gauge.dec()
        flags = response_flags or NO_FLAGS
        values = self._labels.replace(response_flags=flags).values()
        closed, failed = m._children_of_close(values, flags != NO_FLAGS)
        closed.inc()
        if failed is not None:
            failed.inc()


class HttpMetrics:
    """The waypoint's L7 metric families, each labelled `HTTP_LABEL_NAMES`: the traffic labels' values, then
    the response code and `grpc_response_status(...)`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        names = HTTP_LABEL_NAMES
        self.requests = Counter("istio_requests", "Requests handled.", names, registry=registry)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            names,
            registry=registry,
            buckets=HTTP_BUCKETS,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request body size in bytes.",
            names,
            registry=registry,
            buckets=HTTP_BUCKETS,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response body size in bytes.",
            names,
            registry=registry,
            buckets=HTTP_BUCKETS,
        )


def build_info(registry: CollectorRegistry, component: str, tag: str) -> Gauge:
    """`istio_build{component,tag} 1`, which Istio dashboards use to tell versions apart."""
    gauge = Gauge("istio_build", "Build of this proxy.", ("component", "tag"), registry=registry)
    gauge.labels(component, tag).set(1)
    return gauge


# Beyond Istio: how many distinct label sets one peer identity may give its traffic through baggage, and all peers
# together, in one process. Every label set is a series in each traffic metric family for as long as the process
# lives (prometheus-client never forgets one), so without these a single authenticated peer could grow memory and
# /metrics without end by sending a new value each time.
LABEL_SETS_PER_IDENTITY = 32
LABEL_SETS_IN_ALL = 4096
# The `istio_baggage_dropped_items_total` reason of baggage refused whole because it would have been one too many.
REASON_TOO_MANY_LABEL_SETS = "too_many_label_sets"


class PeerLabelBudget:
    """Which peer label sets baggage has been allowed to create, per verified identity.

    An identity is a SPIFFE principal from an mTLS certificate, so only the mesh CA can make a new one; what a peer
    says in its baggage is its own choice. A label set already admitted stays admitted (its series exist anyway);
    a new one is admitted while its identity has had fewer than `per_identity` and the process fewer than `in_all`.
    `per_identity` covers the honest case, one service account's workloads across revisions, clusters and zones.
    The state lives as long as the series it stands for, i.e. the process; it holds at most `in_all` label sets,
    so at most that many identities, and remembers a refusal only for those (plus one flag for all the others).
    """

    __slots__ = ("_admitted", "_in_all", "_per_identity", "_total", "_warned", "_warned_unknown")

    def __init__(self, per_identity: int = LABEL_SETS_PER_IDENTITY, in_all: int = LABEL_SETS_IN_ALL) -> None:
        self._per_identity = per_identity
        self._in_all = in_all
        self._admitted: dict[Identity, set[PeerLabels]] = {}
        self._total = 0
        self._warned: set[Identity] = set()
        self._warned_unknown = False

    def admit(self, identity: Identity, labels: PeerLabels) -> bool:
        """True when `labels` may label traffic of `identity`: seen before, or new and within both bounds."""
        admitted = self._admitted.get(identity)
        if admitted is not None and labels in admitted:
            return True
        if self._total >= self._in_all or (admitted is not None and len(admitted) >= self._per_identity):
            return False
        if admitted is None:
            admitted = self._admitted[identity] = set()
        admitted.add(labels)
        self._total += 1
        return True

    def first_refusal(self, identity: Identity) -> bool:
        """True the first time this is asked for `identity` (or, for identities with no label set admitted, the
        first time for any of them): so a refusal is logged once, however often a peer makes us refuse."""
        if identity in self._admitted:
            if identity in self._warned:
                return False
            self._warned.add(identity)
            return True
        if self._warned_unknown:
            return False
        self._warned_unknown = True
        return True

    @property
    def per_identity(self) -> int:
        return self._per_identity

    @property
    def in_all(self) -> int:
        return self._in_all

    def __len__(self) -> int:
        """Label sets admitted so far."""
        return self._total


class BaggageMetrics:
    """Ours, not Istio's: how often baggage was refused, in part (the parser's bounds) or whole (the parser's
    bounds, or the peer's label sets spent), and why. It also holds the daemon's `PeerLabelBudget`, as every
    daemon passes this object to `mesh.peers.peer_from_baggage` for the whole of its run."""

    def __init__(self, registry: CollectorRegistry, label_sets: PeerLabelBudget | None = None) -> None:
        self.dropped_items = Counter(
            "istio_baggage_dropped_items",
            "Baggage list members dropped by the parser's size and count bounds, or whole headers refused by them "
            "or because the peer identity has described too many different label sets "
            "(ambient-py addition, not an Istio standard metric).",
            ("reason",),
            registry=registry,
        )
        self.label_sets = label_sets if label_sets is not None else PeerLabelBudget()

    def dropped(self, reason: str, count: int = 1) -> None:
        if count > 0:
            self.dropped_items.labels(reason or UNKNOWN).inc(count)

    def record(self, result: ParseResult) -> None:
        """Count what one `hbone.baggage.parse()` refused."""
        self.dropped(result.reason, result.dropped)


def render(registry: CollectorRegistry, accept_header: str | None) -> tuple[bytes, str]:
    """Expose the registry: Prometheus text 0.0.4, or OpenMetrics when the Accept header asks for it."""
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry), content_type


__all__: Sequence[str] = (
    "GRPC_STATUS_CODES",
    "GRPC_UNKNOWN",
    "HTTP_BUCKETS",
    "HTTP_LABEL_NAMES",
    "LABEL_SETS_IN_ALL",
    "LABEL_SETS_PER_IDENTITY",
    "NO_FLAGS",
    "REASON_TOO_MANY_LABEL_SETS",
    "TRAFFIC_LABEL_NAMES",
    "UNKNOWN",
    "BaggageMetrics",
    "HttpMetrics",
    "PeerLabelBudget",
    "PeerLabels",
    "TcpMetrics",
    "TcpRecorder",
    "TrafficLabels",
    "build_info",
    "grpc_response_status",
    "new_registry",
    "render",
)
