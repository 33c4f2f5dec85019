"""`python -m bench [scenario ...]`: run scenarios, print their tables, optionally write JSON."""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

import bench.scenarios  # noqa: F401 - registers the scenarios
from bench.framework import SCENARIOS, Context, Options, ScenarioResult
from bench.procs import ProcessFailed, ProcessGroup
from bench.report import table, write_json
from bench.workers.common import LOOPS

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2G', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1GiB, 512MiB or 1000000")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def parse_loops(text: str) -> tuple[str, ...]:
    loops = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in loops if x not in LOOPS]
    if unknown or not loops:
        raise argparse.ArgumentTypeError(f"--loops takes a comma list of {', '.join(LOOPS)}")
    return loops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the data plane against references measured in the same run.",
        epilog="Scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()),
    )
    p.add_argument("scenarios", nargs="*", metavar="scenario", help="default: all of them")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--runs", type=int, default=3, help="measurements per variant; the median is reported")
    p.add_argument("--seconds", type=float, default=5.0, help="time bound of one measurement (default 5)")
    p.add_argument("--bytes", type=parse_size, default=parse_size("4GiB"), help="byte bound of one bulk run")
    p.add_argument("--loops", type=parse_loops, default=LOOPS, help="event loops of Python variants")
    p.add_argument(
        "--quiet-wait", type=float, default=60.0, metavar="SECONDS",
        help="before each run wait up to this long for other load to drop (default 60; 0: never wait)",
    )
    p.add_argument(
        "--quiet-threshold", type=float, default=15.0, metavar="PERCENT",
        help="other load, in %% of one core, under which the machine counts as quiet (default 15)",
    )
    p.add_argument(
        "--max-other-load", type=float, default=25.0, metavar="PERCENT",
        help="measure a run again if other load exceeded this during it (default 25; see --retries)",
    )
    p.add_argument("--retries", type=int, default=3, help="re-measurements of a disturbed run (default 3)")
    p.add_argument(
        "--rate", type=float, default=1000.0,
        help="request scenarios: requests/s of the fixed-rate keep-alive runs (latency, CPU per 1000 requests; "
        "default 1000)",
    )
    p.add_argument(
        "--new-conn-rate", type=float, default=200.0,
        help="request scenarios: requests/s of the fixed-rate runs with a new connection per request (default 200)",
    )
    p.add_argument(
        "--connections", type=int, default=16, help="request scenarios: concurrent connections (default 16)"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--profile", type=Path, metavar="DIR", help="one extra run per Python variant under py-spy")
    p.add_argument("--native", action="store_true", help="with --profile: C frames too (py-spy --native)")
    p.add_argument("--verify", action="store_true", help="sha256 the bulk data at source and sink")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, certificates, logs)")
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes an exception, so that `with ProcessGroup` stops every process like Ctrl-C does.
    raise KeyboardInterrupt(f"signal {signum}")


def run_scenario(name: str, options: Options, workdir: Path) -> ScenarioResult:
    folder = workdir / name
    folder.mkdir(parents=True)
    print(f"== {name}", flush=True)
    with ProcessGroup(folder) as procs:
        return SCENARIOS[name].run(Context(options, folder, procs))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:20} {s.summary}")
        return
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.runs < 1 or args.seconds <= 0 or args.rate <= 0 or args.new_conn_rate <= 0 or args.connections < 1:
        sys.exit("--runs and --connections must be ≥ 1; --seconds, --rate and --new-conn-rate > 0")
    options = Options(
        runs=args.runs,
        seconds=args.seconds,
        bytes=args.bytes,
        loops=args.loops,
        profile_dir=args.profile.resolve() if args.profile else None,
        profile_native=args.native,
        verify=args.verify,
        rate=args.rate,
        new_conn_rate=args.new_conn_rate,
        connections=args.connections,
        quiet_threshold=args.quiet_threshold,
        quiet_wait=args.quiet_wait,
        max_other_load=args.max_other_load,
        retries=args.retries,
    )
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    results: list[ScenarioResult] = []
    failed = False
    started = time.monotonic()
    try:
        for name in args.scenarios or list(SCENARIOS):
            try:
                results.append(run_scenario(name, options, workdir))
            except (ProcessFailed, RuntimeError, OSError) as exc:
                failed = True
                print(f"!! {name} failed: {exc}", file=sys.stderr)
                traceback.print_exc(limit=3, file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: all benchmark processes stopped", file=sys.stderr)
        failed = True
    finally:
        if args.keep or failed:
            print(f"work folder (logs, configs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        print()
        print(table(result))
        for detail in result.details:
            print()
            print(detail)
    print(f"\n({time.monotonic() - started:.0f} s)")
    if args.json is not None and results:
        write_json(args.json, options, results)
        print(f"results written to {args.json}")
    if failed:
        sys.exit(1)
