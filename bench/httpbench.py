"""What the request scenarios (ztunnel-http, double-hbone, waypoint-http) share: one way to load a path and
read what it cost, so that their figures mean the same thing.

A `RequestPath` is how the load generator reaches the HTTP server (directly, through stunnel, through a
ztunnel's SOCKS5) and which processes on the way are charged. A `Load` is how hard: a fixed rate (latency
of a path that is not saturated, and CPU per request as Istio quotes it: vCPU per 1000 requests/s) or a
closed loop (as many requests/s as the path takes; latency is then mostly queueing).

`measure_requests` runs `bench.workers.http_load` (the same generator for every variant: it is the one that
speaks SOCKS5) and reads each charged process's CPU around it. CPU per 1000 requests = CPU seconds x 1000 /
requests, which is also the vCPU used per 1000 requests/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.framework import Column, Context, Run, VariantResult
from bench.loadgen import run_http_load
from bench.procs import Process, machine_cpu_seconds
from bench.profiling import PySpy, format_profile, py_spy_binary, read_profile


@dataclass(frozen=True)
class Load:
    label: str  # "keep-alive, 1000/s": the `mode` tag of a variant
    new_connection: bool
    rate: float | None  # None: closed loop


def loads(ctx: Context, *, closed_loop: bool = True, new_connection: bool = True) -> list[Load]:
    """Fixed rate keep-alive (`--rate`), then (optionally) fixed rate with a new connection per request
    (`--new-conn-rate`: lower, every new connection costs far more), then the same two in a closed loop."""
    rate, new_conn_rate = ctx.options.rate, ctx.options.new_conn_rate
    out = [Load(f"keep-alive, {rate:g}/s", False, rate)]
    if new_connection:
        out.append(Load(f"new conn, {new_conn_rate:g}/s", True, new_conn_rate))
    if closed_loop:
        out.append(Load("keep-alive, max", False, None))
        if new_connection:
            out.append(Load("new conn, max", True, None))
    return out


@dataclass
class RequestPath:
    name: str  # "ztunnel pair", "direct", ...
    target: str  # HOST:PORT the request is for (the SOCKS5 destination when `socks5` is set)
    socks5: str | None = None
    bind: str | None = None  # source IP of the generator's connections (the client pod)
    charged: dict[str, Process] = field(default_factory=dict)  # role -> proxy process on the path
    others: list[Process] = field(default_factory=list)  # our processes not charged (servers): for other load


def measure_requests(ctx: Context, path: RequestPath, load: Load) -> Run:
    """One bounded load run; figures: rps, p50/p90/p99 ms, errors, per charged role `cpu_<role>` (CPU s per
    1000 requests) and `core_<role>` (% of a core), `cpu_path` (all roles), `core_other` (other load)."""
    ours = [*path.charged.values(), *path.others]
    before = {proc.pid: proc.cpu_seconds() for proc in ours}
    machine_before, window_start = machine_cpu_seconds(), time.monotonic()
    result = run_http_load(
        ctx.procs, "http-load", path.target, socks5=path.socks5, bind=path.bind,
        connections=ctx.options.connections, seconds=ctx.options.seconds, new_connection=load.new_connection,
        rate=load.rate,
    )  # fmt: skip
    machine, window = machine_cpu_seconds() - machine_before, time.monotonic() - window_start
    spent = {proc.pid: proc.cpu_seconds() - before[proc.pid] for proc in ours}
    for proc in ours:
        if not proc.alive():
            raise proc.failure("died during the run")
    if not result.requests:
        raise RuntimeError(f"{path.name} / {load.label}: no request completed ({result.errors} errors)")
    run = result.as_run()
    total = 0.0
    for role, proc in path.charged.items():
        cpu = spent[proc.pid]
        total += cpu
        run[f"cpu_{role}"] = 1000 * cpu / result.requests
        run[f"core_{role}"] = 100 * cpu / result.seconds
    if path.charged:
        run["cpu_path"] = 1000 * total / result.requests
    used = sum(spent.values()) + (result.cpu or 0.0)
    run["core_other"] = max(0.0, 100 * (machine - used) / window)
    return run


def add_difference(results: list[VariantResult], key: str, baseline: str, out: str) -> None:
    """For each variant with a baseline (a name formatted with its tags), `out` = `key` minus the baseline's
    `key` of the same round (runs are interleaved, so run i of both was measured minutes apart at most)."""
    by_name = {v.name: v for v in results}
    for variant in results:
        try:
            base = by_name.get(baseline.format(**variant.tags))
        except KeyError:
            continue
        if base is None or base is variant:
            continue
        for mine, theirs in zip(variant.runs, base.runs, strict=False):
            if key in mine and key in theirs:
                mine[out] = mine[key] - theirs[key]


def profile_runs(
    ctx: Context, scenario: str, targets: list[tuple[str, Callable[[], Run], dict[str, Process]]]
) -> list[str]:
    """With `--profile DIR`: one extra run of each (variant name, measure, charged processes) with py-spy on
    each charged process (not counted in the figures); returns the hot-spot summaries."""
    folder = ctx.options.profile_dir
    if folder is None:
        return []
    if py_spy_binary() is None:
        return ["profiling skipped: py-spy is not installed (.venv/bin/pip install py-spy)"]
    folder.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name, measure, charged in targets:
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        spies = {
            role: PySpy(proc, folder / f"{scenario}-{slug}-{role}.raw", native=ctx.options.profile_native)
            for role, proc in charged.items()
        }
        ctx.wait_quiet()
        try:
            run = measure()
        finally:
            for spy in spies.values():
                spy.stop()
        figures = ", ".join(f"{k}={v:.4g}" for k, v in run.items())
        ctx.log(f"profiled {name}: {figures}")
        for role, spy in spies.items():
            title = f"{name} {role} [{figures}] ({spy.output})"
            summaries.append(format_profile(title, read_profile(spy.output), spy.log))
    return summaries


REQUEST_COLUMNS = [
    Column("rps", "req/s", "{:.0f}", spread=True),
    Column("p50_ms", "p50 ms", "{:.3f}"),
    Column("p99_ms", "p99 ms", "{:.3f}"),
]
TAIL_COLUMNS = [
    Column("core_other", "other load%", "{:.0f}"),
    Column("errors", "errors", "{:.0f}"),
]
