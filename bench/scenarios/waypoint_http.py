"""waypoint-http: HTTP requests through ztunnel -> waypoint -> ztunnel, against the L4 path ztunnel -> ztunnel.

    L4 path:   client pod --SOCKS5--> ztunnel node1 ==HBONE==> ztunnel node2 --> server pod
    waypoint:  client pod --SOCKS5--> ztunnel node1 ==HBONE==> waypoint ==HBONE==> ztunnel node2 --> server pod

One cluster, two nodes, the real daemons on loopback. The same server pod backs two services: `server`
(no waypoint: L4 only) and `server-wp` (`waypoint: waypoint`: the waypoint parses each HTTP/1.1 request,
routes it to an endpoint and forwards it over its own pooled HBONE connection). Requests go to the service's
VIP; the generator (`bench.workers.http_load`) binds the client pod's IP.

Loads: fixed rate keep-alive (latency, CPU per 1000 requests = vCPU per 1000 req/s), fixed rate with a new
connection per request, and a closed loop keep-alive ("max": the most requests/s on this 2-core machine,
where the generator, the server and the proxies share the cores).

Last, a reference: the waypoint is stopped and `bench.workers.hbone_relay` takes its place (its address, a
certificate for its identity): the same two HBONE ends, relaying bytes to the server pod's ztunnel with no
HTTP in between. Its CPU per request, at the fixed keep-alive rate, is what the waypoint's HBONE legs alone
cost in this runtime; the waypoint's figure minus it is what its HTTP layer costs.
"""

from __future__ import annotations

import importlib.util
import socket
import time

from bench import h11cost
from bench.framework import Column, Context, Ratio, ScenarioResult, Variant, run_interleaved, scenario
from bench.httpbench import REQUEST_COLUMNS, TAIL_COLUMNS, Load, RequestPath, loads, measure_requests, profile_runs
from bench.loadgen import start_http_server
from bench.mesh import BenchMesh
from bench.procs import Process, ProcessFailed, python_module

L4 = "L4 ztunnel pair / {mode}"
WAYPOINT = "via waypoint / {mode}"
# References, each in the waypoint's place: bench.workers.hbone_relay --http <key>.
REFERENCES = {
    "none": "HBONE relay, no HTTP, in the waypoint's place / {mode}",
    "h11": "HBONE + h11 proxy, nothing else, in its place / {mode}",
    "llhttp": "HBONE + llhttp proxy, nothing else, in its place / {mode}",
}

TOPOLOGY = """\
clusters:
- {id: cluster1, network: network1, nodes: [node1, node2], waypoints: [waypoint]}
apps:
- {name: client, cluster: cluster1, node: node1, tcpPort: false}
- {name: server, cluster: cluster1, node: node2, tcpPort: false}
services:
- {name: server, ports: {80: 8080}}
- {name: server-wp, selector: server, ports: {80: 8080}, waypoint: waypoint}
"""


@scenario("waypoint-http", "HTTP requests/s, latency, CPU: ztunnel -> waypoint -> ztunnel vs ztunnel -> ztunnel")
def run(ctx: Context) -> ScenarioResult:
    mesh = BenchMesh(ctx, TOPOLOGY)
    client_ip, server_ip = mesh.pod_ip("client"), mesh.pod_ip("server")
    server, _ = start_http_server(ctx.procs, "http-server", host=server_ip, port=8080)
    z1, z2, waypoint = mesh.start("cluster1/ztunnel/node1", "cluster1/ztunnel/node2", "cluster1/waypoint/waypoint")
    socks5 = mesh.socks5("cluster1", "node1")
    paths = {
        L4: RequestPath(
            "L4", f"{mesh.vip('server')}:80", socks5=socks5, bind=client_ip,
            charged={"src": z1, "dst": z2}, others=[server],
        ),
        WAYPOINT: RequestPath(
            "waypoint", f"{mesh.vip('server-wp')}:80", socks5=socks5, bind=client_ip,
            charged={"src": z1, "wp": waypoint, "dst": z2}, others=[server],
        ),
    }  # fmt: skip
    chosen = [*loads(ctx, closed_loop=False), Load("keep-alive, max", False, None)]
    variants = [
        Variant(name.format(mode=load.label), lambda p=path, m=load: measure_requests(ctx, p, m), {"mode": load.label})
        for load in chosen
        for name, path in paths.items()
    ]
    results = run_interleaved(ctx, variants)
    wp = paths[WAYPOINT]
    details = profile_runs(
        ctx,
        "waypoint-http",
        [
            (WAYPOINT.format(mode=load.label), lambda m=load: measure_requests(ctx, wp, m), wp.charged)
            for load in loads(ctx, closed_loop=False)
        ],
    )
    # The references last: they replace the waypoint for good, one after the other.
    waypoint.stop()
    fixed = chosen[0]
    floors: dict[str, float] = {}
    skipped = []
    for http, name in REFERENCES.items():
        if http == "llhttp" and importlib.util.find_spec("httptools") is None:
            skipped.append(f"{name.format(mode=fixed.label)}: skipped, httptools is not installed")
            continue
        relay = start_relay(ctx, mesh, http)
        path = RequestPath(http, wp.target, socks5=socks5, bind=client_ip,
                           charged={"src": z1, "wp": relay, "dst": z2}, others=[server])  # fmt: skip
        variant = Variant(name.format(mode=fixed.label), lambda p=path: measure_requests(ctx, p, fixed),
                          {"mode": fixed.label})  # fmt: skip
        (measured,) = run_interleaved(ctx, [variant])
        results.append(measured)
        floors[http] = measured.median("cpu_wp") or 0.0
        relay.stop()
    ctx.wait_quiet()
    h11_alone = h11cost.cpu_per_1000_requests()
    l4 = next(v for v in results if v.name == L4.format(mode=fixed.label))
    legs = (l4.median("cpu_src") or 0.0) + (l4.median("cpu_dst") or 0.0)
    notes = [
        f"{ctx.options.runs} runs each, median (min-max); each run {ctx.options.seconds:g} s, "
        f"{ctx.options.connections} connections, GET -> 200 + 1 KiB; fixed rate: latency from each request's "
        "scheduled start; max: closed loop",
        "CPU = CPU s per 1000 requests (= vCPU per 1000 req/s) of the source ztunnel, the waypoint, the "
        "destination ztunnel",
        "target (issue 5): ≤ 0.25 vCPU per 1000 req/s for the waypoint",
        f"for reference, measured in this run, in the waypoint's place (bench/workers/hbone_relay.py, at "
        f"{fixed.label}): its two HBONE ends alone {floors.get('none', 0.0):.3f} CPU s per 1000 requests; the same "
        f"with h11's eleven events per request in callbacks and nothing else (the least an h11 waypoint costs): "
        + (f"{floors['h11']:.3f}" if "h11" in floors else "-")
        + "; with llhttp (httptools) instead: "
        + (f"{floors['llhttp']:.3f}" if "llhttp" in floors else "not measured (httptools not installed)")
        + f". h11 alone, warm in one process (bench/h11cost.py): {h11_alone:.3f}; the two ztunnels of the L4 "
        f"path together: {legs:.3f}",
        *skipped,
    ]
    return ScenarioResult(
        scenario="waypoint-http",
        title="waypoint-http: 1 KiB HTTP requests, client pod -> ztunnel -> [waypoint ->] ztunnel -> server pod",
        columns=[
            *REQUEST_COLUMNS,
            Column("cpu_src", "src zt CPU s/1k req", "{:.3f}"),
            Column("cpu_wp", "waypoint CPU s/1k req", "{:.3f}"),
            Column("cpu_dst", "dst zt CPU s/1k req", "{:.3f}"),
            Column("core_wp", "waypoint core%", "{:.0f}"),
            *TAIL_COLUMNS,
        ],
        variants=results,
        ratios=[
            Ratio("rps", L4, "req/s vs L4"),
            Ratio("p50_ms", L4, "p50 vs L4"),
            Ratio("cpu_path", L4, "path CPU/req vs L4"),
        ],
        notes=notes,
        details=details,
        extra={
            "h11_cpu_per_1000_requests": h11_alone,
            "l4_ztunnels_cpu_per_1000_requests": legs,
            **{f"relay_{http}_cpu_per_1000_requests": cpu for http, cpu in floors.items()},
        },
    )


def start_relay(ctx: Context, mesh: BenchMesh, http: str) -> Process:
    """`bench.workers.hbone_relay --http <http>` on the (stopped) waypoint's HBONE address, as the waypoint's
    identity, sending every stream to the server pod's ztunnel; returns once it accepts connections."""
    plan = mesh.mesh.process("cluster1/waypoint/waypoint")
    namespace, _pod, account = plan.env["PROXY_WORKLOAD_INFO"].split("/")
    topology = mesh.mesh.topology
    server = mesh.mesh.pod("server")
    argv = python_module(
        "bench.workers.hbone_relay",
        "--listen", plan.env["INBOUND_ADDR"],
        "--ca-dir", plan.env["CA_CERTS_DIR"],
        "--identity", topology.identity(namespace, account),
        "--upstream", f"{server.ip}:15008",
        "--authority", f"{server.ip}:8080",
        "--expect", topology.identity(server.namespace, mesh.mesh.app_spec(server).service_account),
        "--http", http,
    )  # fmt: skip
    relay = ctx.procs.start(f"hbone-relay-{http}", argv)
    host, _, port = plan.env["INBOUND_ADDR"].rpartition(":")
    deadline = time.monotonic() + 15.0
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return relay
        except OSError:
            pass
        if not relay.alive():
            raise relay.failure("exited before listening")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{relay.name} not listening on {host}:{port} after 15s\n{relay.log_tail()}")
        time.sleep(0.05)
