"""double-hbone: bulk throughput and request latency across networks (ztunnel -> east-west gateway -> ztunnel),
against one HBONE hop (ztunnel -> ztunnel, same network) and against direct, in the same run.

    direct:        client pod ---------------------------------------------------------------> far pod
    1 HBONE hop:   client pod --SOCKS5--> ztunnel c1/node1 ==HBONE==> ztunnel c1/node2 --------> near pod
    double HBONE:  client pod --SOCKS5--> ztunnel c1/node1 ==outer HBONE (mTLS to the gateway)==>
                   gateway of network2 --TCP--> ztunnel c2/node1 (inner mTLS + HTTP/2 CONNECT, end to end) --> far pod

Two clusters on two networks on loopback (`topology`'s loopback mode: the networks are not isolated, which
changes nothing on the measured path: cluster1 only knows the far service as a split-horizon workload behind
network2's gateway, so its ztunnel must go through that gateway). The daemons are the real ones. Both
services are reached by VIP; the client binds its pod IP.

Bulk: `bench.workers.source` writes as fast as the path takes it for `--seconds` (or `--bytes`) into
`bench.workers.sink` on the destination pod; MB/s is the sink's (first byte to EOF, handshakes excluded).
CPU s/GiB adds every proxy on the path (source ztunnel, gateway, destination ztunnel).
Requests: `bench.workers.http_load` to `bench.workers.http_server` on the destination pod, at a fixed rate,
keep-alive and one new connection per request (which costs the double path a new inner TLS handshake).
"""

from __future__ import annotations

import time

from bench.framework import Column, Context, Ratio, Run, ScenarioResult, Variant, run_interleaved, scenario
from bench.httpbench import REQUEST_COLUMNS, RequestPath, loads, measure_requests, profile_runs
from bench.loadgen import start_http_server
from bench.mesh import BenchMesh
from bench.procs import Process, machine_cpu_seconds, python_module, wait_listening

GiB = 1 << 30
DIRECT = "direct / {mode}"
ONE_HOP = "1 HBONE hop / {mode}"
DOUBLE = "double HBONE / {mode}"
BULK = "bulk"
SINK_PORT, HTTP_PORT = 9000, 8080

TOPOLOGY = """\
clusters:
- {id: cluster1, network: network1, nodes: [node1, node2], gateway: eastwest}
- {id: cluster2, network: network2, nodes: [node1], gateway: eastwest}
apps:
- {name: client, cluster: cluster1, node: node1, tcpPort: false}
- {name: near, cluster: cluster1, node: node2}
- {name: far, cluster: cluster2, node: node1}
services:
- {name: near, ports: {80: 8080, 9000: 9000}}
- {name: far, ports: {80: 8080, 9000: 9000}}
"""


def measure_bulk(ctx: Context, path: RequestPath, sink: Process) -> Run:
    """One bounded bulk transfer along `path` (its `target` is the sink's address as the client names it)."""
    opts = ctx.options
    ours = [*path.charged.values(), sink]
    before = {proc.pid: proc.cpu_seconds() for proc in ours}
    machine_before, window_start = machine_cpu_seconds(), time.monotonic()
    argv = python_module(
        "bench.workers.source", "--connect", path.target, "--bytes", opts.bytes, "--seconds", opts.seconds
    )
    if path.socks5:
        argv += ["--socks5", path.socks5]
    if path.bind:
        argv += ["--bind", path.bind]
    source = ctx.procs.start("source", argv)
    timeout = opts.seconds * 4 + 60
    try:
        received = sink.read_json(timeout)
        sent = source.read_json(timeout)
    finally:
        source.stop()
    machine, window = machine_cpu_seconds() - machine_before, time.monotonic() - window_start
    spent = {proc.pid: proc.cpu_seconds() - before[proc.pid] for proc in ours}
    for proc in path.charged.values():
        if not proc.alive():
            raise proc.failure("died during the run")
    if received["bytes"] != sent["bytes"]:
        raise RuntimeError(f"{path.name}: the sink got {received['bytes']} bytes, the source sent {sent['bytes']}")
    gib, seconds = received["bytes"] / GiB, received["seconds"]
    run: Run = {"mbps": received["bytes"] / seconds / 1e6}
    total = 0.0
    for role, proc in path.charged.items():
        total += spent[proc.pid]
        run[f"gib_cpu_{role}"] = spent[proc.pid] / gib
        run[f"core_{role}"] = 100 * spent[proc.pid] / seconds
    if path.charged:
        run["gib_cpu_path"] = total / gib
    # The sink's spent CPU counts all its threads; the source reports its own.
    used = sum(spent.values()) + sent["cpu"]
    run["core_other"] = max(0.0, 100 * (machine - used) / window)
    return run


def start_sink(ctx: Context, name: str, host: str) -> Process:
    proc = ctx.procs.start(name, python_module("bench.workers.sink", "--host", host, "--port", SINK_PORT))
    wait_listening(SINK_PORT, proc)
    return proc


@scenario("double-hbone", "bulk MB/s and request latency: ztunnel -> gateway -> ztunnel vs one HBONE hop vs direct")
def run(ctx: Context) -> ScenarioResult:
    mesh = BenchMesh(ctx, TOPOLOGY)
    client_ip, near_ip, far_ip = mesh.pod_ip("client"), mesh.pod_ip("near"), mesh.pod_ip("far")
    near_sink, far_sink = start_sink(ctx, "near-sink", near_ip), start_sink(ctx, "far-sink", far_ip)
    near_http, _ = start_http_server(ctx.procs, "near-http", host=near_ip, port=HTTP_PORT)
    far_http, _ = start_http_server(ctx.procs, "far-http", host=far_ip, port=HTTP_PORT)
    src, near_zt, gateway, far_zt = mesh.start(
        "cluster1/ztunnel/node1", "cluster1/ztunnel/node2", "cluster2/gateway/eastwest", "cluster2/ztunnel/node1"
    )
    socks5 = mesh.socks5("cluster1", "node1")
    near_vip, far_vip = mesh.vip("near"), mesh.vip("far")

    def paths(port: int, direct_port: int, servers: tuple[Process, Process]) -> dict[str, RequestPath]:
        near, far = servers
        return {
            DIRECT: RequestPath("direct", f"{far_ip}:{direct_port}", bind=client_ip, others=[far]),
            ONE_HOP: RequestPath(
                "1 HBONE hop",
                f"{near_vip}:{port}",
                socks5=socks5,
                bind=client_ip,
                charged={"src": src, "dst": near_zt},
                others=[near],
            ),
            DOUBLE: RequestPath(
                "double HBONE",
                f"{far_vip}:{port}",
                socks5=socks5,
                bind=client_ip,
                charged={"src": src, "gw": gateway, "dst": far_zt},
                others=[far],
            ),
        }

    bulk = paths(SINK_PORT, SINK_PORT, (near_sink, far_sink))
    sinks = {DIRECT: far_sink, ONE_HOP: near_sink, DOUBLE: far_sink}
    http = paths(80, HTTP_PORT, (near_http, far_http))
    variants = [
        Variant(name.format(mode=BULK), lambda p=path, s=sinks[name]: measure_bulk(ctx, p, s), {"mode": BULK})
        for name, path in bulk.items()
    ]
    variants += [
        Variant(name.format(mode=load.label), lambda p=path, m=load: measure_requests(ctx, p, m), {"mode": load.label})
        for load in loads(ctx, closed_loop=False)
        for name, path in http.items()
    ]
    results = run_interleaved(ctx, variants)
    targets = [(DOUBLE.format(mode=BULK), lambda: measure_bulk(ctx, bulk[DOUBLE], far_sink), bulk[DOUBLE].charged)]
    targets += [
        (DOUBLE.format(mode=load.label), lambda m=load: measure_requests(ctx, http[DOUBLE], m), http[DOUBLE].charged)
        for load in loads(ctx, closed_loop=False)
    ]
    details = profile_runs(ctx, "double-hbone", targets)

    notes = [
        f"{ctx.options.runs} runs each, median (min-max); each run ≤ {ctx.options.seconds:g} s "
        f"(bulk also ≤ {ctx.options.bytes / GiB:g} GiB); MB = 10^6 bytes; one client connection per bulk run; "
        f"requests: {ctx.options.connections} connections, GET -> 200 + 1 KiB, fixed rate, latency from each "
        "request's scheduled start",
        "CPU = all proxies on the path: source ztunnel (+ gateway) + destination ztunnel; per GiB for bulk, "
        "per 1000 requests (= vCPU per 1000 req/s) for requests",
        "target (issue 4): double-HBONE bulk MB/s ≥ 0.5x one HBONE hop",
    ]
    return ScenarioResult(
        scenario="double-hbone",
        title="double-hbone: client pod -> ztunnel -> [east-west gateway ->] ztunnel -> pod (loopback, 2 networks)",
        columns=[
            Column("mbps", "MB/s", "{:.0f}", spread=True),
            Column("gib_cpu_path", "path CPU s/GiB", "{:.2f}"),
            Column("gib_cpu_gw", "gw CPU s/GiB", "{:.2f}"),
            *REQUEST_COLUMNS,
            Column("cpu_path", "path CPU s/1k req", "{:.3f}"),
            Column("cpu_gw", "gw CPU s/1k req", "{:.3f}"),
            Column("core_other", "other load%", "{:.0f}"),
        ],
        variants=results,
        ratios=[
            Ratio("mbps", ONE_HOP, "MB/s vs 1 hop", spread=True),
            Ratio("mbps", DIRECT, "MB/s vs direct"),
            Ratio("p50_ms", ONE_HOP, "p50 vs 1 hop"),
            Ratio("cpu_path", ONE_HOP, "CPU/req vs 1 hop"),
        ],
        notes=notes,
        details=details,
    )
