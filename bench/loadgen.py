"""Request load for HTTP scenarios (ztunnel-http, waypoint-http, double-hbone's latency part).

Two generators, both run as separate processes:
- `wrk` (Debian's, with `--latency` percentiles): the faster one, for paths it can reach by plain TCP.
- `bench.workers.http_load`: Python, slower, but goes through SOCKS5 (the way into a ztunnel) and can
  hold N connections open for memory figures.
Within one scenario use ONE generator for every variant, or the ratios compare the generators too.

The server side is `bench.workers.http_server` (200 + 1 KiB by default, keep-alive, pipelining).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from bench.procs import Process, ProcessGroup, free_port, python_module, wait_listening


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int  # failed connections or requests (socket errors, timeouts, early closes)
    non_2xx: int
    seconds: float
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    cpu: float | None = None  # CPU seconds of the generator itself (http_load only)

    def as_run(self) -> dict[str, float]:
        """The figures as a `framework.Run` (missing percentiles left out)."""
        figures = {"rps": self.rps, "errors": float(self.errors + self.non_2xx)}
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            value = getattr(self, key)
            if value is not None:
                figures[key] = value
        return figures


# -- the server ------------------------------------------------------------------------------------------
def start_http_server(
    procs: ProcessGroup, name: str, *, host: str = "127.0.0.1", port: int | None = None, size: int = 1024,
    loop: str = "uvloop",
) -> tuple[Process, int]:
    """Start `bench.workers.http_server` and wait until it listens; returns it and its port."""
    port = port or free_port(host)
    argv = python_module("bench.workers.http_server", "--listen", f"{host}:{port}", "--size", size, "--loop", loop)
    proc = procs.start(name, argv)
    wait_listening(port, proc)
    return proc, port


# -- wrk -------------------------------------------------------------------------------------------------
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


def parse_wrk(text: str) -> LoadResult:
    """Read `wrk --latency` output: requests, duration, errors, non-2xx/3xx, Requests/sec, percentiles."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rps:
        raise ValueError(f"unexpected wrk output:\n{text}")
    percentiles = {int(p): _ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", text, re.M)}
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(
        requests=int(done[1]),
        errors=sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        seconds=_ms(done[2] + done[3]) / 1000,
        rps=float(rps[1]),
        p50_ms=percentiles.get(50),
        p90_ms=percentiles.get(90),
        p99_ms=percentiles.get(99),
    )


def run_wrk(
    procs: ProcessGroup,
    name: str,
    url: str,
    *,
    connections: int = 10,
    threads: int = 1,
    seconds: float = 5.0,
    new_connection: bool = False,
) -> LoadResult:
    """One bounded `wrk` run. `new_connection` sends `Connection: close`, so wrk reconnects per request
    (its latency then excludes the connect; compare like with like)."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (make bench installs it: scripts/setup-system.sh wrk)")
    argv = [binary, "--latency", "-t", str(threads), "-c", str(max(connections, threads))]
    argv += ["-d", f"{max(1, round(seconds))}s", "--timeout", "5s"]
    if new_connection:
        argv += ["-H", "Connection: close"]
    proc = procs.start(name, [*argv, url])
    proc.wait(seconds + 30)
    return parse_wrk(proc.output())


# -- the Python generator --------------------------------------------------------------------------------
def run_http_load(
    procs: ProcessGroup,
    name: str,
    target: str,
    *,
    socks5: str | None = None,
    connect: str | None = None,
    connections: int = 10,
    seconds: float = 5.0,
    new_connection: bool = False,
    loop: str = "uvloop",
    bind: str | None = None,
    rate: float | None = None,
) -> LoadResult:
    """One bounded run of `bench.workers.http_load` against `target` (HOST:PORT), maybe via SOCKS5.

    `bind`: source IP of the first hop (the client pod, by which a ztunnel knows who connects); `rate`:
    requests per second on a fixed schedule instead of a closed loop (see the worker's docstring)."""
    argv = python_module(
        "bench.workers.http_load", "--target", target, "--connections", connections, "--seconds", seconds,
        "--loop", loop,
    )
    if socks5:
        argv += ["--socks5", socks5]
    if bind:
        argv += ["--bind", bind]
    if rate:
        argv += ["--rate", str(rate)]
    if connect:
        argv += ["--connect", connect]
    if new_connection:
        argv.append("--new-connection")
    proc = procs.start(name, argv)
    record = proc.read_json(seconds + 60)
    proc.wait(10)
    non_2xx = sum(n for status, n in record["statuses"].items() if not status.startswith("2"))
    return LoadResult(
        requests=record["requests"],
        errors=record["errors"],
        non_2xx=non_2xx,
        seconds=record["seconds"],
        rps=record["rps"],
        p50_ms=record["p50_ms"],
        p90_ms=record["p90_ms"],
        p99_ms=record["p99_ms"],
        cpu=record.get("cpu"),
    )


def hold_connections(
    procs: ProcessGroup,
    name: str,
    target: str,
    count: int,
    *,
    socks5: str | None = None,
    bind: str | None = None,
    timeout: float = 120,
) -> Process:
    """Open `count` connections (one request each) and keep them open; stop the returned process to
    close them. For RSS per open connection: read the proxy's memory before and after."""
    argv = python_module("bench.workers.http_load", "--target", target, "--hold", count)
    if socks5:
        argv += ["--socks5", socks5]
    if bind:
        argv += ["--bind", bind]
    proc = procs.start(name, argv)
    record = proc.read_json(timeout)
    if record["open"] != count:
        raise proc.failure(f"opened {record['open']} of {count} connections ({record['errors']} errors)")
    return proc
