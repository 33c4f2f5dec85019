"""hbone-throughput: bulk bytes through ONE tunnel, our HBONE pair against stunnel and a plain relay pair.

Every variant has the same shape, four processes on loopback:

    source --TCP--> client-side proxy ==(tunnel)==> server-side proxy --TCP--> sink

- stunnel:     two stunnel processes, TLS 1.3 mTLS, TLS_AES_256_GCM_SHA384, certificates from our PKI
- plain relay: two asyncio TCP relays (no TLS, no HTTP/2): the most an asyncio relay pair can move
- HBONE:       our client (TCP in, `hbone.client.dial` + `open_stream`, `hbone.relay.Relay`) and our server
               (`HboneServer`, CONNECT to the sink, `Relay`): mTLS + HTTP/2 CONNECT as ztunnel uses it

MB/s is what the sink saw (10^6 bytes per second, first byte to EOF); CPU is each proxy's user+system time
over the run divided by the GiB moved; "core %" is that CPU over the transfer time (100 % = one core busy),
and "all 4 core %" adds the source's and the sink's: near 200 % the two cores are the limit, and CPU per GiB
is the figure that says who uses them. "other load %" is CPU the rest of the machine used meanwhile: on a
shared host, figures of a run with much of it are not worth much.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import stunnel
from bench.framework import Column, Context, Ratio, Run, ScenarioResult, Variant, run_interleaved, scenario
from bench.pki import BenchPki, CertFiles
from bench.procs import Process, free_port, machine_cpu_seconds, python_module, wait_listening
from bench.profiling import PySpy, format_profile, py_spy_binary, read_profile

GiB = 1 << 30
HOST = "127.0.0.1"
STUNNEL = "stunnel TLS1.3 mTLS"
PLAIN = "plain relay / {loop}"
HBONE = "HBONE / {loop}"


@dataclass
class Pipeline:
    """The long-lived processes of one variant; a source process is started per run."""

    name: str
    entry_port: int  # where the source connects
    proxies: dict[str, Process]  # "client" and "server"
    sink: Process
    loop: str | None = None  # event loop of Python proxies; None for stunnel (py-spy cannot look inside)

    @property
    def tags(self) -> dict[str, str]:
        return {"loop": self.loop} if self.loop else {}


def start_sink(ctx: Context, name: str) -> tuple[Process, int]:
    port = free_port()
    argv = python_module("bench.workers.sink", "--port", port)
    if ctx.options.verify:
        argv.append("--hash")
    proc = ctx.procs.start(f"{name}-sink", argv)
    wait_listening(port, proc)
    return proc, port


def start_stunnel_pair(ctx: Context, client_certs: CertFiles, server_certs: CertFiles) -> Pipeline:
    sink, sink_port = start_sink(ctx, "stunnel")
    server_port, client_port = free_port(), free_port()
    folder = ctx.workdir / "stunnel"
    server = stunnel.start(
        ctx.procs, "stunnel-server", folder, client=False, accept=server_port, connect=sink_port, certs=server_certs
    )
    client = stunnel.start(
        ctx.procs, "stunnel-client", folder, client=True, accept=client_port, connect=server_port, certs=client_certs
    )
    return Pipeline(STUNNEL, client_port, {"client": client, "server": server}, sink)


def start_plain_pair(ctx: Context, loop: str) -> Pipeline:
    name = PLAIN.format(loop=loop)
    prefix = f"plain-{loop}"
    sink, sink_port = start_sink(ctx, prefix)
    server_port, client_port = free_port(), free_port()
    server = ctx.procs.start(
        f"{prefix}-server",
        python_module(
            "bench.workers.tcp_relay", "--listen", f"{HOST}:{server_port}", "--connect", f"{HOST}:{sink_port}",
            "--loop", loop,
        ),
    )
    client = ctx.procs.start(
        f"{prefix}-client",
        python_module(
            "bench.workers.tcp_relay", "--listen", f"{HOST}:{client_port}", "--connect", f"{HOST}:{server_port}",
            "--loop", loop,
        ),
    )
    wait_listening(server_port, server)
    wait_listening(client_port, client)
    return Pipeline(name, client_port, {"client": client, "server": server}, sink, loop)


def start_hbone_pair(ctx: Context, loop: str, client_certs: CertFiles, server_certs: CertFiles) -> Pipeline:
    name = HBONE.format(loop=loop)
    prefix = f"hbone-{loop}"
    sink, sink_port = start_sink(ctx, prefix)
    server_port, client_port = free_port(), free_port()
    server = ctx.procs.start(
        f"{prefix}-server",
        python_module(
            "bench.workers.hbone_server", "--listen", f"{HOST}:{server_port}", "--certs", server_certs.folder,
            "--loop", loop,
        ),
    )
    client = ctx.procs.start(
        f"{prefix}-client",
        python_module(
            "bench.workers.hbone_client", "--listen", f"{HOST}:{client_port}", "--server", f"{HOST}:{server_port}",
            "--target", f"{HOST}:{sink_port}", "--certs", client_certs.folder, "--expect", server_certs.identity,
            "--loop", loop,
        ),
    )
    wait_listening(server_port, server)
    wait_listening(client_port, client)
    return Pipeline(name, client_port, {"client": client, "server": server}, sink, loop)


def measure(ctx: Context, pipe: Pipeline) -> Run:
    """One bounded bulk transfer through `pipe`; CPU and memory of its proxies read around it."""
    opts = ctx.options
    machine_before, window_start = machine_cpu_seconds(), time.monotonic()
    before = {role: proc.cpu_seconds() for role, proc in pipe.proxies.items()}
    faults_before = {role: proc.minor_faults() for role, proc in pipe.proxies.items()}
    argv = python_module(
        "bench.workers.source", "--connect", f"{HOST}:{pipe.entry_port}", "--bytes", opts.bytes,
        "--seconds", opts.seconds,
    )
    if opts.verify:
        argv.append("--hash")
    source = ctx.procs.start("source", argv)
    timeout = opts.seconds * 4 + 60
    try:
        received = pipe.sink.read_json(timeout)
        sent = source.read_json(timeout)
    finally:
        source.stop()
    after = {role: proc.cpu_seconds() for role, proc in pipe.proxies.items()}
    faults = {role: proc.minor_faults() - faults_before[role] for role, proc in pipe.proxies.items()}
    machine, window = machine_cpu_seconds() - machine_before, time.monotonic() - window_start
    for proc in pipe.proxies.values():
        if not proc.alive():
            raise proc.failure("died during the run")
    if received["bytes"] != sent["bytes"] or received["sha256"] != sent["sha256"]:
        raise RuntimeError(
            f"{pipe.name}: the sink got {received['bytes']} bytes (sha256 {received['sha256']}), "
            f"the source sent {sent['bytes']} (sha256 {sent['sha256']})"
        )
    gib = received["bytes"] / GiB
    seconds = received["seconds"]
    run: Run = {"mbps": received["bytes"] / seconds / 1e6}
    for role, proc in pipe.proxies.items():
        cpu = after[role] - before[role]
        run[f"cpu_{role}"] = cpu / gib
        run[f"core_{role}"] = 100 * cpu / seconds
        run[f"faults_{role}"] = faults[role] / gib  # minor page faults per GiB (JSON only)
        memory = proc.memory()
        run[f"rss_{role}"] = memory["rss"] / (1 << 20)
        run[f"peak_rss_{role}"] = memory["peak_rss"] / (1 << 20)
    run["cpu_pair"] = run["cpu_client"] + run["cpu_server"]
    # How busy the whole machine was with this pipeline (200 % = both cores): source and sink included.
    ours = sum(after[role] - before[role] for role in pipe.proxies) + sent["cpu"] + received["cpu"]
    run["core_all"] = 100 * ours / seconds
    # Anything else the machine did meanwhile (other jobs on a shared host) skews the figures: show it.
    run["core_other"] = max(0.0, 100 * (machine - ours) / window)
    return run


def profile(ctx: Context, pipe: Pipeline) -> list[str]:
    """One extra run with py-spy on both proxies; returns the hot-spot summaries."""
    assert ctx.options.profile_dir is not None
    folder = ctx.options.profile_dir
    folder.mkdir(parents=True, exist_ok=True)
    slug = pipe.name.replace(" / ", "-").replace(" ", "-")
    spies = {
        role: PySpy(proc, folder / f"hbone-throughput-{slug}-{role}.raw", native=ctx.options.profile_native)
        for role, proc in pipe.proxies.items()
    }
    ctx.wait_quiet()
    try:
        run = measure(ctx, pipe)
    finally:
        for spy in spies.values():
            spy.stop()
    ctx.log(f"profiled {pipe.name}: {run['mbps']:.0f} MB/s under py-spy")
    summaries = []
    for role, spy in spies.items():
        summaries.append(format_profile(f"{pipe.name} {role} ({spy.output})", read_profile(spy.output), spy.log))
    return summaries


COLUMNS = [
    Column("mbps", "MB/s", "{:.0f}", spread=True),
    Column("cpu_client", "cli CPU s/GiB", "{:.2f}"),
    Column("cpu_server", "srv CPU s/GiB", "{:.2f}"),
    Column("cpu_pair", "pair s/GiB", "{:.2f}"),
    Column("core_client", "cli core%", "{:.0f}"),
    Column("core_server", "srv core%", "{:.0f}"),
    Column("core_all", "all 4 core%", "{:.0f}"),
    Column("core_other", "other load%", "{:.0f}"),
    Column("peak_rss_client", "cli RSS MiB", "{:.0f}"),
    Column("peak_rss_server", "srv RSS MiB", "{:.0f}"),
]
RATIOS = [
    Ratio("mbps", STUNNEL, "MB/s vs stunnel", spread=True),
    Ratio("mbps", PLAIN, "MB/s vs plain"),
    Ratio("cpu_pair", STUNNEL, "CPU/GiB vs stunnel"),
]


@scenario("hbone-throughput", "bulk MB/s and CPU/GiB of one tunnel: HBONE pair vs stunnel pair vs plain relay")
def run(ctx: Context) -> ScenarioResult:
    pki = BenchPki(ctx.workdir / "pki")
    client_certs, server_certs = pki.issue("bench-client"), pki.issue("bench-server")
    pipes = [start_stunnel_pair(ctx, client_certs, server_certs)]
    for loop in ctx.options.loops:
        pipes.append(start_plain_pair(ctx, loop))
        pipes.append(start_hbone_pair(ctx, loop, client_certs, server_certs))
    variants = [Variant(p.name, lambda p=p: measure(ctx, p), p.tags) for p in pipes]
    results = run_interleaved(ctx, variants)

    notes = [
        f"{ctx.options.runs} runs each, median (min-max); each run ≤ {ctx.options.seconds:g} s or "
        f"{ctx.options.bytes / GiB:g} GiB; MB = 10^6 bytes; 1 HBONE connection + 1 CONNECT stream per run",
    ]
    details: list[str] = []
    if ctx.options.profile_dir is not None:
        if py_spy_binary() is None:
            notes.append("profiling skipped: py-spy is not installed (.venv/bin/pip install py-spy)")
        else:
            for pipe in pipes:
                if pipe.loop is not None:
                    details += profile(ctx, pipe)
    return ScenarioResult(
        scenario="hbone-throughput",
        title="hbone-throughput: one tunnel, bulk, source -> client proxy -> server proxy -> sink (loopback)",
        columns=COLUMNS,
        variants=results,
        ratios=RATIOS,
        notes=notes,
        details=details,
    )
