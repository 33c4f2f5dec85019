"""Istio standard metrics, scraped over a real socket the way Prometheus does; and the access log lines."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hbone.baggage import parse as parse_baggage
from hbone.identity import Identity
from mesh import accesslog
from mesh import metrics as metrics_module
from mesh.accesslog import AccessLog, configure_access_log, format_text
from mesh.http_server import serve_http, stats_routes
from mesh.metrics import (
    HTTP_BUCKETS,
    HTTP_LABEL_NAMES,
    TRAFFIC_LABEL_NAMES,
    BaggageMetrics,
    PeerLabels,
    TcpMetrics,
    TrafficLabels,
    build_info,
    new_registry,
    render,
)
from mesh.model import Locality, Workload
from mesh.peers import peer_from_baggage
from waypoint_py.telemetry import RequestReport, RequestTelemetry

TCP_COUNTERS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_connections_failed_total",
)

CURL = PeerLabels(
    workload="curl", canonical_service="curl", canonical_revision="v1", namespace="default",
    principal="cluster.local/ns/default/sa/curl", app="curl", version="v1", cluster="cluster1",
    region="r1", zone="z1",
)
ECHO = PeerLabels(workload="echo", namespace="default", cluster="cluster2", app="")


def outbound(dest: PeerLabels = ECHO) -> TrafficLabels:
    return TrafficLabels(
        reporter="source",
        source=CURL,
        destination=dest,
        destination_service="echo.default.svc.cluster.local",
        destination_service_namespace="default",
        destination_service_name="echo",
        connection_security_policy="mutual_tls",
    )


@pytest.fixture
async def stats() -> AsyncIterator[tuple[CollectorRegistry, int]]:
    registry = new_registry()
    server = await serve_http("127.0.0.1", 0, stats_routes(registry), name="stats")
    port = server.sockets[0].getsockname()[1]
    yield registry, port
    server.close()
    await server.wait_closed()


async def scrape(port: int, path: str = "/metrics", accept: str | None = None) -> tuple[str, str]:
    def get() -> tuple[str, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.headers["Content-Type"], resp.read().decode()

    return await asyncio.to_thread(get)


def samples(text: str, name: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


async def test_tcp_series_carry_exactly_the_27_labels_with_unknown_for_missing(stats: tuple) -> None:
    registry, port = stats
    tcp = TcpMetrics(registry)
    rec = tcp.open(outbound())
    rec.add_received(1000)
    rec.add_sent(20)
    rec.close("CONNECT")

    content_type, text = await scrape(port)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert len(TRAFFIC_LABEL_NAMES) == 27 and len(set(TRAFFIC_LABEL_NAMES)) == 27
    for name in TCP_COUNTERS:
        found = samples(text, name)
        assert len(found) == 1, name
        labels = found[0].labels
        assert set(labels) == set(TRAFFIC_LABEL_NAMES), name
        assert labels["source_principal"] == "cluster.local/ns/default/sa/curl"
        assert labels["destination_workload"] == "echo"
        # Missing and empty both render as `unknown`.
        assert labels["destination_principal"] == "unknown"
        assert labels["destination_app"] == "unknown"
        assert labels["request_protocol"] == "tcp"
    by_name = {name: samples(text, name)[0] for name in TCP_COUNTERS}
    assert by_name["istio_tcp_received_bytes_total"].value == 1000
    assert by_name["istio_tcp_sent_bytes_total"].value == 20
    # Opened and bytes keep the open's flags; closed and failed carry the final one.
    assert by_name["istio_tcp_connections_opened_total"].labels["response_flags"] == "-"
    assert by_name["istio_tcp_connections_closed_total"].labels["response_flags"] == "CONNECT"
    assert by_name["istio_tcp_connections_failed_total"].labels["response_flags"] == "CONNECT"
    assert "_created" not in text
    assert [s.value for s in samples(text, "istio_tcp_sockets_open")] == [0]


async def test_bytes_in_flight_show_on_scrape_and_sockets_open_counts(stats: tuple) -> None:
    registry, port = stats
    tcp = TcpMetrics(registry)
    a = tcp.open(outbound())
    b = tcp.open(TrafficLabels(reporter="destination"))
    a.add_received(5)
    a.add_received(7)
    _, text = await scrape(port)
    assert [s.value for s in samples(text, "istio_tcp_received_bytes_total")
            if s.labels["reporter"] == "source"] == [12]
    gauges = {s.labels["reporter"]: s.value for s in samples(text, "istio_tcp_sockets_open")}
    assert gauges == {"source": 1, "destination": 1}
    assert len(labels := samples(text, "istio_tcp_sockets_open")[0].labels) == 1 and "reporter" in labels

    a.add_received(3)
    a.close()
    a.close("DENY")  # idempotent: the second close changes nothing
    b.close()
    _, text = await scrape(port)
    assert [s.value for s in samples(text, "istio_tcp_received_bytes_total")
            if s.labels["reporter"] == "source"] == [15]
    assert samples(text, "istio_tcp_connections_failed_total") == []
    assert sum(s.value for s in samples(text, "istio_tcp_connections_closed_total")) == 2
    assert {s.value for s in samples(text, "istio_tcp_sockets_open")} == {0}
    assert tcp.live == 0


async def test_provisional_recorder_takes_labels_learned_later(stats: tuple) -> None:
    registry, port = stats
    tcp = TcpMetrics(registry)
    gateway = PeerLabels(workload="ew-gateway")
    rec = tcp.open(outbound(gateway), provisional=True)
    rec.add_sent(9)
    _, text = await scrape(port)
    assert samples(text, "istio_tcp_connections_opened_total") == []  # not committed yet
    assert rec.relabel(outbound(PeerLabels(workload="echo-remote", cluster="cluster2")))
    assert not rec.relabel(outbound(gateway))  # too late: already published
    rec.close()
    _, text = await scrape(port)
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total",
                 "istio_tcp_connections_closed_total"):
        (sample,) = samples(text, name)
        assert sample.labels["destination_workload"] == "echo-remote"
    assert samples(text, "istio_tcp_sent_bytes_total")[0].value == 9


async def test_http_metrics_buckets_and_labels(stats: tuple) -> None:
    registry, port = stats
    telemetry = RequestTelemetry(registry, AccessLog("text"))

    def request(grpc: bool, code: int, grpc_status: str | None, received: int, sent: int) -> RequestReport:
        return RequestReport(CURL, None, "10.0.0.1:5000", "POST", "/", "echo", "HTTP/2", grpc, 0.0, ECHO,
                             response_code=code, grpc_status=grpc_status, request_bytes=received, response_bytes=sent)

    telemetry.record(request(False, 200, None, 0, 1234), ended=0.003)  # 3 ms
    telemetry.record(request(True, 200, "0", 10, 10), ended=0.0002)
    telemetry.record(request(True, 503, None, 10, 0), ended=0.0002)  # no status: no trailers

    _, text = await scrape(port, "/stats/prometheus")
    requests = samples(text, "istio_requests_total")
    (plain,) = [s for s in requests if s.labels["request_protocol"] == "http"]
    assert set(plain.labels) == set(HTTP_LABEL_NAMES)
    assert plain.labels["grpc_response_status"] == ""  # plain HTTP: empty, as Envoy reports it
    assert plain.labels["response_code"] == "200" and plain.labels["reporter"] == "waypoint"
    grpc = {s.labels["response_code"]: s.labels["grpc_response_status"] for s in requests
            if s.labels["request_protocol"] == "grpc"}  # fmt: skip
    assert grpc == {"200": "0", "503": "unknown"}  # gRPC without a status: `unknown`, as every missing value
    for hist in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        buckets = [s for s in samples(text, hist + "_bucket") if s.labels["request_protocol"] == "http"]
        edges = [float(s.labels["le"]) for s in buckets]
        assert edges == [float(b) for b in HTTP_BUCKETS] + [float("inf")], hist
    duration = {
        float(s.labels["le"]): s.value
        for s in samples(text, "istio_request_duration_milliseconds_bucket")
        if s.labels["request_protocol"] == "http"
    }
    assert duration[1.0] == 0 and duration[5.0] == 1
    assert "_created" not in text


async def test_build_info_baggage_counter_and_openmetrics(stats: tuple) -> None:
    registry, port = stats
    build_info(registry, "ztunnel", "0.1.0")
    baggage = BaggageMetrics(registry)
    baggage.dropped("too_many_members", 3)
    baggage.dropped("member_too_long")

    content_type, text = await scrape(port)
    (build,) = samples(text, "istio_build")
    assert build.labels == {"component": "ztunnel", "tag": "0.1.0"} and build.value == 1
    dropped = {s.labels["reason"]: s.value for s in samples(text, "istio_baggage_dropped_items_total")}
    assert dropped == {"too_many_members": 3, "member_too_long": 1}
    assert "not an Istio standard metric" in text

    content_type, text = await scrape(port, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "_created" not in text


def test_registries_are_independent() -> None:
    a, b = new_registry(), new_registry()
    TcpMetrics(a).open(outbound())
    TcpMetrics(b)  # the same metric names register again without clashing
    assert a.get_sample_value("istio_tcp_sockets_open", {"reporter": "source"}) == 1
    assert b.get_sample_value("istio_tcp_sockets_open", {"reporter": "source"}) is None


def test_label_values_follow_spec_order() -> None:
    values = outbound().values()
    assert values[0] == "source"
    assert dict(zip(TRAFFIC_LABEL_NAMES, values, strict=True))["source_zone"] == "z1"
    locality = ("source_region", "source_zone", "destination_region", "destination_zone")
    assert TRAFFIC_LABEL_NAMES[-4:] == locality
    assert TrafficLabels(reporter="destination").as_dict()["connection_security_policy"] == "unknown"


def test_peer_labels_from_workload_and_baggage() -> None:
    w = Workload(uid="u1", name="echo-1", namespace="default", service_account="echo", cluster_id="cluster1",
                 workload_name="echo", canonical_name="echo-svc", canonical_revision="v2",
                 locality=Locality(region="r1", zone="z1"))
    dest = PeerLabels.of_workload(w, principal=w.identity)
    assert dest == PeerLabels(workload="echo", canonical_service="echo-svc", canonical_revision="v2",
                              namespace="default", principal="spiffe://cluster.local/ns/default/sa/echo",
                              app="echo-svc", version="v2", cluster="cluster1", region="r1", zone="z1")
    assert PeerLabels.of_workload(w).principal is None  # a source without mTLS has no principal

    derived = PeerLabels.of_baggage(w.baggage())
    assert derived.app == "echo"  # ztunnel's derived labels use the workload name for app
    assert derived.canonical_service == "echo-svc" and derived.cluster == "cluster1"

    registry = new_registry()
    BaggageMetrics(registry).record(parse_baggage(["k8s.deployment.name=a b"]))
    assert registry.get_sample_value("istio_baggage_dropped_items_total", {"reason": "invalid_value"}) == 1


def test_peer_from_baggage_pins_the_namespace_and_treats_unusable_baggage_as_absent() -> None:
    registry = new_registry()
    counted = BaggageMetrics(registry)
    stranger = Identity("cluster.local", "elsewhere", "stranger")
    claim = [b"k8s.namespace.name=default,k8s.deployment.name=liar,service.name=a b", b"service.version=v1"]
    labels = peer_from_baggage(claim, stranger, counted)
    assert labels is not None
    assert (labels.workload, labels.version, labels.canonical_service) == ("liar", "v1", None)
    assert labels.namespace == "elsewhere" and labels.principal == str(stranger)  # the certificate's, not the claim
    assert registry.get_sample_value("istio_baggage_dropped_items_total", {"reason": "invalid_value"}) == 1
    # No header, one refused whole, one naming nothing we know: all absent (the caller's fallback applies).
    assert peer_from_baggage([], stranger, counted) is None
    assert peer_from_baggage([b"service.name=sl\xe9ep"], stranger, counted) is None
    assert peer_from_baggage([b"x-unknown=1"], stranger, counted) is None
    assert registry.get_sample_value("istio_baggage_dropped_items_total", {"reason": "not_ascii"}) == 1
    # Baggage is only taken from a peer that authenticated with mTLS on that connection (SPEC §4.2): without a
    # verified identity none is usable, however well formed, and none of it is parsed or counted.
    before = registry.get_sample_value("istio_baggage_dropped_items_total", {"reason": "invalid_value"})
    good = [b"k8s.cluster.name=c1,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep"]
    assert peer_from_baggage(good, stranger, counted) is not None
    assert peer_from_baggage(good, None, counted) is None
    assert peer_from_baggage([b"k8s.namespace.name=default,service.name=a b"], None, counted) is None
    assert registry.get_sample_value("istio_baggage_dropped_items_total", {"reason": "invalid_value"}) == before


# --- access log -----------------------------------------------------------------------------------------


def test_access_log_text_quotes_only_what_needs_it() -> None:
    fields = {"src.addr": "10.0.0.1:5000", "error": "connection refused", "empty": "", "skip": None,
              "ok": True, "bytes_sent": 12}
    line = format_text("connection complete", fields, now=0.25)
    assert line == ('1970-01-01T00:00:00.250000Z info access connection complete src.addr=10.0.0.1:5000 '
                    'error="connection refused" empty="" ok=true bytes_sent=12')


@pytest.fixture
def restore_logging() -> Iterator[None]:
    # configure_access_log changes process-wide logger state; other tests must not inherit it.
    root, access = logging.getLogger(), logging.getLogger("access")
    saved = (root.level, access.level, access.propagate, list(access.handlers))
    yield
    root.setLevel(saved[0])
    access.setLevel(saved[1])
    access.propagate = saved[2]
    access.handlers[:] = saved[3]


def test_access_log_writes_text_and_json_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_access_log(stream)
    configure_access_log(stream)  # configuring twice must not double the lines
    logging.getLogger().setLevel(logging.ERROR)  # the daemon's level does not silence the access log
    AccessLog("text").write({"dst.addr": "10.0.0.2:80", "reason": 'said "no"\n'})
    AccessLog("json").write({"dst.addr": "10.0.0.2:80", "bytes_recv": 3, "none": None}, message="request")
    text_line, json_line = stream.getvalue().splitlines()
    assert text_line.endswith(r'access connection complete dst.addr=10.0.0.2:80 reason="said \"no\"\n"')
    record = json.loads(json_line)
    assert record["scope"] == "access" and record["message"] == "request"
    assert record["dst.addr"] == "10.0.0.2:80" and record["bytes_recv"] == 3 and "none" not in record
    with pytest.raises(ValueError, match="xml"):
        AccessLog("xml")


async def test_access_lines_are_written_in_batches_inside_a_loop(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_access_log(stream)
    log = AccessLog("text")
    for i in range(3):
        log.write({"n": i})
    assert stream.getvalue() == ""  # held: one write for the batch, not one per line
    await asyncio.sleep(accesslog.FLUSH_INTERVAL + 0.3)
    assert [line.rsplit(" ", 1)[1] for line in stream.getvalue().splitlines()] == ["n=0", "n=1", "n=2"]
    # A full buffer goes out at once, without waiting for the interval.
    big = "x" * 1000
    written = 0
    while big not in stream.getvalue():
        assert written <= accesslog.FLUSH_BYTES // 1000, "a full buffer was not written"
        log.write({"big": big})
        written += 1
    assert stream.getvalue().count(big) == written
    # And what is pending when the process exits is written by the flush the runner calls.
    log.write({"last": 1})
    accesslog.flush_access_log()
    assert stream.getvalue().endswith(" last=1\n")


def test_recorder_follows_live_counters_at_each_flush() -> None:
    registry = new_registry()
    tcp = TcpMetrics(registry)
    rec = tcp.open(TrafficLabels("source"))
    counts = [100, 0]  # bytes that flowed before the recorder started following are not its own
    rec.follow(counts)
    counts[0] += 1000
    counts[1] += 20
    text = render(registry, "")[0].decode()
    assert 'istio_tcp_received_bytes_total{' in text and "} 1000.0" in text
    counts[0] += 5
    rec.close()
    text = render(registry, "")[0].decode()
    assert "} 1005.0" in text and "} 20.0" in text


@pytest.mark.parametrize("cache_limit", [4096, 1])
def test_connections_with_repeating_label_sets_count_apart(monkeypatch, cache_limit: int) -> None:
    """Recorders reuse the metric children of a label set (and forget them past the limit); counts stay
    per label set and per closing flag, whichever way."""
    monkeypatch.setattr(metrics_module, "CHILD_CACHE_LIMIT", cache_limit)
    registry = new_registry()
    tcp = TcpMetrics(registry)
    other = dataclasses.replace(ECHO, workload="echo-2")
    for i in range(6):
        rec = tcp.open(outbound(ECHO if i % 2 else other))
        rec.add_received(10)
        rec.close("CONNECT" if i % 3 == 0 else "-")
    text = render(registry, "")[0].decode()
    opened = {s.labels["destination_workload"]: s.value for s in samples(text, "istio_tcp_connections_opened_total")}
    assert opened == {"echo": 3, "echo-2": 3}
    received = {s.labels["destination_workload"]: s.value for s in samples(text, "istio_tcp_received_bytes_total")}
    assert received == {"echo": 30, "echo-2": 30}
    closed = {(s.labels["destination_workload"], s.labels["response_flags"]): s.value
              for s in samples(text, "istio_tcp_connections_closed_total")}  # fmt: skip
    assert closed == {("echo-2", "CONNECT"): 1, ("echo", "CONNECT"): 1, ("echo-2", "-"): 2, ("echo", "-"): 2}
    failed = {s.labels["destination_workload"]: s.value for s in samples(text, "istio_tcp_connections_failed_total")}
    assert failed == {"echo-2": 1, "echo": 1}
    assert [s.value for s in samples(text, "istio_tcp_sockets_open")] == [0]


def test_access_lines_of_a_closed_loop_do_not_wait_for_the_next_batch(restore_logging: None) -> None:
    """A line held by a loop that closed before its flush timer fired goes out with the next loop's batch."""
    stream = io.StringIO()
    configure_access_log(stream)
    log = AccessLog("text")

    async def write(n: int) -> None:
        log.write({"n": n})

    asyncio.run(write(1))  # the loop closes with the line still held
    assert stream.getvalue() == ""

    async def write_and_wait() -> None:
        log.write({"n": 2})
        await asyncio.sleep(accesslog.FLUSH_INTERVAL + 0.3)

    asyncio.run(write_and_wait())
    assert [line.rsplit(" ", 1)[1] for line in stream.getvalue().splitlines()] == ["n=1", "n=2"]
