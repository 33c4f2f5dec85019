"""`python -m demo` (what `make demo` runs)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from demo import edges as edges_mod
from demo.prometheus import BINARY as PROMETHEUS
from demo.prometheus import Prometheus
from demo.traffic import send
from topology.launch import Mesh

TOPOLOGY = Path(__file__).resolve().parent.parent / "topology" / "examples" / "two-networks.yaml"


def say(text: str) -> None:
    print(text, flush=True)


async def run_once(baggage: bool, args: argparse.Namespace, workdir: Path) -> list[edges_mod.Edge]:
    started = time.monotonic()
    flag = "on" if baggage else "off"
    say(f"\n>>> AMBIENT_ENABLE_BAGGAGE={'true' if baggage else 'false'}: starting the mesh "
        f"(2 clusters, 2 networks: ztunnel, waypoint and east-west gateway per cluster, 7 app pods)...")  # fmt: skip
    mesh = Mesh(args.topology, workdir / f"baggage-{flag}", baggage=baggage, mode=args.mode)
    await mesh.start()
    prom: Prometheus | None = None
    try:
        why = f": {mesh.mode_reason}" if mesh.mode_reason else ""
        say(f"    up in {time.monotonic() - started:.1f}s ({mesh.mode} mode{why})")
        use_prom = PROMETHEUS is not None and not args.no_prometheus
        if use_prom:
            prom = Prometheus(mesh, workdir / f"prometheus-{flag}")
            await prom.start()
            say(f"    Prometheus scraping {len(mesh.scrape_targets())} daemons every second")
        say("    sending traffic with curl from the sleep pod:")
        for call, answers in await send(mesh, args.scale):
            served = ", ".join(f"{pod} x{answers.count(pod)}" for pod in sorted(set(answers)))
            say(f"      {call.label}: {served}")
        if prom is not None:
            await prom.wait_for_scrape()
            found = await edges_mod.from_prometheus(prom)
            source = (
                "read from Prometheus with PromQL: sum by (daemon, reporter, source_workload, source_cluster, "
                "destination_workload, destination_cluster) (istio_tcp_connections_opened_total), ... "
                "(istio_requests_total)"
            )
        else:
            found = await edges_mod.from_scrapes(mesh)
            source = "summed from each daemon's /metrics (install Debian's prometheus to read it with PromQL)"
        say("")
        say(edges_mod.render(found, f"Who talked to whom, AMBIENT_ENABLE_BAGGAGE={flag}", source))
        if args.keep and baggage == args.keep_baggage:
            say(keep_message(mesh, prom))
            await asyncio.Event().wait()
        return found
    finally:
        if prom is not None:
            await prom.stop()
        await mesh.stop()


def keep_message(mesh: Mesh, prom: Prometheus | None) -> str:
    lines = ["", "The mesh keeps running (Ctrl-C stops everything). Try:"]
    lines.append("  " + " ".join(mesh.curl_argv("sleep", "http://reviews.default.svc.cluster.local:9080/")))
    for name, target in sorted(mesh.scrape_targets().items()):
        lines.append(f"  {name}: " + " ".join(mesh.mgmt_argv(["curl", "-s", f"http://{target}/metrics"])))
    if prom is not None:
        lines.append(
            f"  Prometheus: {' '.join(mesh.mgmt_argv(['curl', '-s', f'http://127.0.0.1:{prom.port}/api/v1/query?query=istio_requests_total']))}"
        )
    lines.append(f"  logs and configs: {mesh.workdir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument(
        "--topology", type=Path, default=TOPOLOGY, help="topology file (default: the two-network example)"
    )
    parser.add_argument("--mode", choices=("auto", "netns", "loopback"), default="auto",
                        help="network namespaces (root) or loopback addresses; auto picks")  # fmt: skip
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of requests")
    parser.add_argument("--no-prometheus", action="store_true", help="read /metrics directly, without Prometheus")
    parser.add_argument("--keep", action="store_true", help="keep the baggage-on mesh running at the end")
    parser.add_argument("--workdir", type=Path, help="where configs, PKI and logs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.keep_baggage = True
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ambient-demo-") as tmp:
        workdir = args.workdir or Path(tmp)

        async def both() -> None:
            off = await run_once(False, args, workdir)
            on = await run_once(True, args, workdir)
            say("")
            say(summary(off, on))

        try:
            asyncio.run(both())
        except KeyboardInterrupt:
            return 130
    say(f"\nDone in {time.monotonic() - started:.0f}s; everything it started is stopped.")
    return 0


def summary(off: list[edges_mod.Edge], on: list[edges_mod.Edge]) -> str:
    def unknown(edges: list[edges_mod.Edge]) -> int:
        return sum(1 for e in edges if e.count and e.remote_unknown)

    return (
        f"The difference the flag makes: {unknown(off)} edges have an 'unknown' peer with baggage off, {unknown(on)} "
        "with it on.\nOff, a daemon cannot name a peer on the other network (Istio before 1.29); on, every daemon's "
        "metrics name both ends of each cross-network call."
    )


if __name__ == "__main__":
    sys.exit(main())
