"""Printing results as plain-text tables and writing them as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.framework import Options, ScenarioResult


def _cell(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


def table(result: ScenarioResult) -> str:
    headers = ["variant"] + [c.header for c in result.columns] + [r.header for r in result.ratios]
    rows = []
    for v in result.variants:
        row = [v.name]
        for c in result.columns:
            text = _cell(c.fmt, v.median(c.key))
            spread = v.spread(c.key) if c.spread else None
            if spread is not None and len(v.runs) > 1:
                text += f" ({c.fmt.format(spread[0])}-{c.fmt.format(spread[1])})"
            row.append(text)
        for r in result.ratios:
            ratio = result.ratio(v, r)
            text = "-" if ratio is None else f"{ratio:.2f}x"
            rounds = result.round_ratios(v, r) if r.spread and ratio is not None else []
            if len(rounds) > 1:
                text += f" ({min(rounds):.2f}-{max(rounds):.2f})"
            row.append(text)
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    out = [result.title, line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    out += [f"  * {note}" for note in result.notes]
    disturbed = {v.name: sum(1 for r in v.runs if r.get("disturbed")) for v in result.variants}
    if any(disturbed.values()):
        which = ", ".join(f"{name}: {n}" for name, n in disturbed.items() if n)
        out.append(f"  * runs kept although other load on the machine disturbed them: {which}")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def write_json(path: Path, options: Options, results: list[ScenarioResult]) -> None:
    doc = {
        "machine": machine(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "scenarios": {r.scenario: r.to_json() for r in results},
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
