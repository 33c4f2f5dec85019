"""The pieces every scenario uses: the registry, the options and context it runs with, and its results.

A scenario is a function `run(ctx) -> ScenarioResult` registered under a name with `@scenario(...)`. It
starts its processes through `ctx.procs` (stopped by the harness whatever happens), measures each variant
`ctx.options.runs` times with `run_interleaved`, and describes its table with `Column`s and `Ratio`s.
Ratios compare medians against a baseline variant measured in the same run of the harness.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ProcessGroup, wait_quiet

Run = dict[str, float]  # one measurement of one variant: metric key -> value


@dataclass(frozen=True)
class Options:
    runs: int = 3
    seconds: float = 5.0  # bound of one measurement
    bytes: int = 4 << 30  # other bound of one bulk measurement
    loops: tuple[str, ...] = ("uvloop", "asyncio")
    profile_dir: Path | None = None  # set: one extra run per Python variant under py-spy
    profile_native: bool = False
    verify: bool = False  # bulk data: hash on both ends (costs CPU in source and sink, not in proxies)
    rate: float = 1000.0  # requests/s of the fixed-rate keep-alive runs of request scenarios
    new_conn_rate: float = 200.0  # ... and of their fixed-rate runs with a new connection per request
    connections: int = 16  # concurrent connections of the request scenarios' load
    quiet_threshold: float = 15.0  # before each run, wait for other load below this (% of one core) ...
    quiet_wait: float = 60.0  # ... for at most this many seconds (0: do not wait)
    max_other_load: float = 25.0  # a run during which other load ("core_other") exceeded this ...
    retries: int = 3  # ... is measured again, at most this many times


@dataclass
class Context:
    options: Options
    workdir: Path  # private temporary folder of this scenario: configs, certificates, logs
    procs: ProcessGroup

    def log(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def wait_quiet(self) -> None:
        """On a shared machine, start a measurement only when other jobs leave the CPUs alone."""
        if self.options.quiet_wait <= 0:
            return
        load = wait_quiet(self.options.quiet_threshold, self.options.quiet_wait)
        if load >= self.options.quiet_threshold:
            self.log(f"warning: the machine is still {load:.0f} % busy with other work; measuring anyway")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = "{:.1f}"
    spread: bool = False  # also print min-max over the runs


@dataclass(frozen=True)
class Ratio:
    """`key`'s median of each variant divided by that of the baseline variant (>1: more than the baseline).

    `baseline` is a variant name, formatted with the variant's tags: "plain relay / {loop}" compares each
    variant with the plain relay on the same event loop; a variant without that tag gets no ratio.
    """

    key: str
    baseline: str
    header: str
    # Also print the lowest and highest ratio of one round (run i of the variant over run i of the baseline:
    # runs take turns, so those two were measured minutes apart at most). For ratios a target is judged by.
    spread: bool = False


@dataclass
class VariantResult:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [run[key] for run in self.runs if key in run]
        return statistics.median(values) if values else None

    def spread(self, key: str) -> tuple[float, float] | None:
        values = [run[key] for run in self.runs if key in run]
        return (min(values), max(values)) if values else None


@dataclass
class ScenarioResult:
    scenario: str
    title: str
    columns: list[Column]
    variants: list[VariantResult]
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # printed below the table (e.g. profiles)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the JSON

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def _baseline(self, variant: VariantResult, ratio: Ratio) -> VariantResult | None:
        """The variant `ratio` compares `variant` with; None if it has none (or is its own baseline)."""
        try:
            base = self.variant(ratio.baseline.format(**variant.tags))
        except KeyError:
            return None
        return None if base is variant else base

    def ratio(self, variant: VariantResult, ratio: Ratio) -> float | None:
        base = self._baseline(variant, ratio)
        if base is None:
            return None
        mine, theirs = variant.median(ratio.key), base.median(ratio.key)
        if mine is None or not theirs:
            return None
        return mine / theirs

    def round_ratios(self, variant: VariantResult, ratio: Ratio) -> list[float]:
        """`ratio` of each round that measured both the variant and its baseline."""
        base = self._baseline(variant, ratio)
        if base is None:
            return []
        return [
            mine[ratio.key] / theirs[ratio.key]
            for mine, theirs in zip(variant.runs, base.runs, strict=False)
            if ratio.key in mine and theirs.get(ratio.key)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "variants": {
                v.name: {
                    "tags": v.tags,
                    "median": {c.key: v.median(c.key) for c in self.columns},
                    "runs": v.runs,
                    "ratios": {r.header: self.ratio(v, r) for r in self.ratios},
                    "round_ratios": {r.header: self.round_ratios(v, r) for r in self.ratios if r.spread},
                }
                for v in self.variants
            },
            "notes": self.notes,
            "details": self.details,
            **self.extra,
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Context], ScenarioResult]


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, summary: str) -> Callable[[Callable[[Context], ScenarioResult]], Callable[..., Any]]:
    """Register `run(ctx) -> ScenarioResult` as scenario `name` (`python -m bench name`)."""

    def register(run: Callable[[Context], ScenarioResult]) -> Callable[[Context], ScenarioResult]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, summary, run)
        return run

    return register


@dataclass
class Variant:
    """One thing measured in a scenario: its processes are up, `measure()` does one bounded run."""

    name: str
    measure: Callable[[], Run]
    tags: dict[str, str] = field(default_factory=dict)


def run_interleaved(ctx: Context, variants: list[Variant], runs: int | None = None) -> list[VariantResult]:
    """Measure every variant `runs` times, round-robin (A B C, A B C, ...), so that a slow drift of the
    machine (thermal, a noisy neighbour) spreads over all variants instead of biasing the last one."""
    results = [VariantResult(v.name, dict(v.tags)) for v in variants]
    total = runs or ctx.options.runs
    for i in range(total):
        for variant, result in zip(variants, results, strict=True):
            run = _measure_undisturbed(ctx, variant)
            result.runs.append(run)
            ctx.log(f"run {i + 1}/{total} {variant.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in run.items()))
    return results


def _measure_undisturbed(ctx: Context, variant: Variant) -> Run:
    """One run of `variant`; repeated while other work on the machine took more than `max_other_load` % of a
    core during it (runs that report "core_other"). The last attempt is kept regardless, marked disturbed."""
    for attempt in range(ctx.options.retries + 1):
        ctx.wait_quiet()
        run = variant.measure()
        other = run.get("core_other", 0.0)
        if other <= ctx.options.max_other_load:
            return run
        if attempt < ctx.options.retries:
            ctx.log(f"{variant.name}: other load was {other:.0f} % of a core during the run; measuring again")
    run["disturbed"] = 1.0
    return run
