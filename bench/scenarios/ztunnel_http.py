"""ztunnel-http: 1 KiB HTTP requests through a ztunnel pair, against direct and against an stunnel mTLS pair.

    direct:        http_load (client pod IP) --------------------------------------------> http_server
    stunnel pair:  http_load --> stunnel client ==TLS 1.3 mTLS==> stunnel server --------> http_server
    ztunnel pair:  http_load (client pod IP) --SOCKS5--> ztunnel node1 ==HBONE==> ztunnel node2 --> http_server
    TLS relay pair (reference, keep-alive at the fixed rate only):
                   http_load --> tls_relay client ==TLS 1.3 mTLS==> tls_relay server -----> http_server

The ztunnels are the real daemons (`python -m ztunnel_py`, shared mode, one per node, mesh state from
`topology`), the client pod on node1, the server pod on node2; requests go to the service VIP. The same
generator (`bench.workers.http_load`, the one that speaks SOCKS5) loads every variant, binding the client
pod's IP. Loads: a fixed rate (`--rate`, default 1000/s over `--connections`): latency of a path that keeps
up, and CPU per 1000 requests; a closed loop ("max"): the most requests/s. Each with keep-alive and with a
new connection per request (its latency includes connect, and for the ztunnel the SOCKS5 exchange).

The TLS relay pair (`bench.workers.tls_relay`) is the ztunnels' TLS layer and certificates with nothing else:
one TLS session per client connection, bytes copied both ways, no HTTP/2. Its added latency is the floor of
this runtime for a TLS proxy pair, next to stunnel's (C) and the ztunnels'.

Added latency = p50 of the variant minus p50 of direct in the same round. Memory: each ztunnel's RSS at rest
(after one request, so the pooled HBONE connection exists) and with 1,000 open tunnelled connections.
"""

from __future__ import annotations

import time

from bench import stunnel
from bench.framework import Column, Context, Ratio, ScenarioResult, Variant, run_interleaved, scenario
from bench.httpbench import (
    REQUEST_COLUMNS,
    TAIL_COLUMNS,
    RequestPath,
    add_difference,
    loads,
    measure_requests,
    profile_runs,
)
from bench.loadgen import hold_connections, run_http_load, start_http_server
from bench.mesh import BenchMesh
from bench.pki import BenchPki
from bench.procs import Process, free_port, python_module, wait_listening

DIRECT = "direct / {mode}"
STUNNEL = "stunnel pair / {mode}"
ZTUNNEL = "ztunnel pair / {mode}"
TLS_RELAY = "TLS relay pair, no HTTP/2 (reference) / {mode}"
HELD = 1000
MiB = 1 << 20

TOPOLOGY = """\
clusters:
- {id: cluster1, network: network1, nodes: [node1, node2]}
apps:
- {name: client, cluster: cluster1, node: node1, tcpPort: false}
- {name: server, cluster: cluster1, node: node2, tcpPort: false}
services:
- {name: server, ports: {80: 8080}}
"""


def memory_per_connection(ctx: Context, mesh: BenchMesh, path: RequestPath) -> dict[str, float]:
    """RSS of each ztunnel at rest and with `HELD` open tunnelled connections (one request made on each)."""
    run_http_load(ctx.procs, "warm-up", path.target, socks5=path.socks5, bind=path.bind, connections=1, seconds=0.5)
    time.sleep(0.5)
    rest = {role: proc.memory()["rss"] for role, proc in path.charged.items()}
    holder = hold_connections(ctx.procs, "hold", path.target, HELD, socks5=path.socks5, bind=path.bind)
    time.sleep(0.5)
    held = {role: proc.memory()["rss"] for role, proc in path.charged.items()}
    holder.stop()
    figures: dict[str, float] = {}
    for role in path.charged:
        figures[f"rss_rest_{role}_mib"] = rest[role] / MiB
        figures[f"rss_held_{role}_mib"] = held[role] / MiB
        figures[f"kib_per_conn_{role}"] = (held[role] - rest[role]) / HELD / 1024
    return figures


def start_tls_relays(ctx: Context, pki: BenchPki, server_ip: str, server_port: int) -> tuple[dict[str, Process], int]:
    """The reference pair, `bench.workers.tls_relay`: its processes by role, and the client side's port."""
    server_port_tls, client_port = free_port(), free_port()
    hops = {  # role: (its port, where it connects); the server side first, so the client side can reach it
        "server": (server_port_tls, f"{server_ip}:{server_port}"),
        "client": (client_port, f"127.0.0.1:{server_port_tls}"),
    }
    procs: dict[str, Process] = {}
    for role, (listen, connect) in hops.items():
        procs[role] = ctx.procs.start(
            f"tls-relay-{role}",
            python_module(
                "bench.workers.tls_relay", "--role", role, "--listen", f"127.0.0.1:{listen}", "--connect", connect,
                "--certs", pki.issue(f"relay-{role}").folder,
            ),
        )  # fmt: skip
        wait_listening(listen, procs[role])
    return procs, client_port


@scenario("ztunnel-http", "1 KiB HTTP requests through a ztunnel pair vs direct vs an stunnel pair; CPU, RSS")
def run(ctx: Context) -> ScenarioResult:
    mesh = BenchMesh(ctx, TOPOLOGY)
    client_ip, server_ip = mesh.pod_ip("client"), mesh.pod_ip("server")
    server, server_port = start_http_server(ctx.procs, "http-server", host=server_ip, port=8080)
    z1, z2 = mesh.start("cluster1/ztunnel/node1", "cluster1/ztunnel/node2")

    pki = BenchPki(ctx.workdir / "pki")
    folder = ctx.workdir / "stunnel"
    s_server_port, s_client_port = free_port(), free_port()
    s_server = stunnel.start(
        ctx.procs, "stunnel-server", folder, client=False, accept=s_server_port, connect=server_port,
        certs=pki.issue("bench-server"), connect_host=server_ip,
    )  # fmt: skip
    s_client = stunnel.start(
        ctx.procs, "stunnel-client", folder, client=True, accept=s_client_port, connect=s_server_port,
        certs=pki.issue("bench-client"),
    )  # fmt: skip

    r_client, r_client_port = start_tls_relays(ctx, pki, server_ip, server_port)
    paths = {
        DIRECT: RequestPath("direct", f"{server_ip}:{server_port}", bind=client_ip, others=[server]),
        STUNNEL: RequestPath(
            "stunnel pair",
            f"127.0.0.1:{s_client_port}",
            bind=client_ip,
            charged={"client": s_client, "server": s_server},
            others=[server],
        ),
        ZTUNNEL: RequestPath(
            "ztunnel pair",
            f"{mesh.vip('server')}:80",
            socks5=mesh.socks5("cluster1", "node1"),
            bind=client_ip,
            charged={"client": z1, "server": z2},
            others=[server],
        ),
    }
    memory = memory_per_connection(ctx, mesh, paths[ZTUNNEL])
    ctx.log("RSS: " + ", ".join(f"{k}={v:.2f}" for k, v in memory.items()))

    reference = RequestPath(
        "TLS relay pair", f"127.0.0.1:{r_client_port}", bind=client_ip, charged=r_client, others=[server]
    )
    variants = [
        Variant(name.format(mode=load.label), lambda p=path, m=load: measure_requests(ctx, p, m), {"mode": load.label})
        for load in loads(ctx)
        for name, path in paths.items()
    ]
    keep_alive = loads(ctx)[0]
    variants.append(
        Variant(
            TLS_RELAY.format(mode=keep_alive.label),
            lambda: measure_requests(ctx, reference, keep_alive),
            {"mode": keep_alive.label},
        )
    )
    results = run_interleaved(ctx, variants)
    add_difference(results, "p50_ms", DIRECT, "added_p50_ms")
    zt = paths[ZTUNNEL]
    details = profile_runs(
        ctx,
        "ztunnel-http",
        [
            (ZTUNNEL.format(mode=load.label), lambda m=load: measure_requests(ctx, zt, m), zt.charged)
            for load in loads(ctx, closed_loop=False)
        ],
    )

    mem = memory
    notes = [
        f"{ctx.options.runs} runs each, median (min-max); each run {ctx.options.seconds:g} s, "
        f"{ctx.options.connections} connections, GET -> 200 + 1 KiB; same generator (http_load) for all",
        "fixed rate: latency from each request's scheduled start; closed loop (max): as fast as answers come",
        "added p50 = p50 - direct's p50 of the same round; cli/srv CPU = CPU s per 1000 requests of the "
        "client-side / server-side proxy (= vCPU per 1000 req/s)",
        f"ztunnel RSS at rest / with {HELD} open tunnelled connections: node1 {mem['rss_rest_client_mib']:.1f} / "
        f"{mem['rss_held_client_mib']:.1f} MiB ({mem['kib_per_conn_client']:.1f} KiB per connection), node2 "
        f"{mem['rss_rest_server_mib']:.1f} / {mem['rss_held_server_mib']:.1f} MiB "
        f"({mem['kib_per_conn_server']:.1f} KiB per connection)",
        "targets (issue 3): added p50 vs stunnel ≤ 1.5x; ≤ 0.15 vCPU per 1000 req/s per ztunnel; "
        "≤ 30 KiB per open connection",
    ]
    return ScenarioResult(
        scenario="ztunnel-http",
        title="ztunnel-http: 1 KiB HTTP requests, client pod -> [proxy pair] -> server pod (loopback)",
        columns=[
            *REQUEST_COLUMNS,
            Column("added_p50_ms", "added p50 ms", "{:.3f}"),
            Column("cpu_client", "cli CPU s/1k req", "{:.3f}"),
            Column("cpu_server", "srv CPU s/1k req", "{:.3f}"),
            Column("core_client", "cli core%", "{:.0f}"),
            Column("core_server", "srv core%", "{:.0f}"),
            *TAIL_COLUMNS,
        ],
        variants=results,
        ratios=[
            Ratio("rps", DIRECT, "req/s vs direct"),
            Ratio("added_p50_ms", STUNNEL, "added p50 vs stunnel", spread=True),
            Ratio("cpu_path", STUNNEL, "CPU/req vs stunnel"),
        ],
        notes=notes,
        details=details,
        extra={"memory": memory, "held_connections": HELD},
    )
