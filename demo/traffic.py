"""The traffic the demo sends: real curl from the `sleep` pod, through its node's ztunnel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from topology.launch import Mesh


@dataclass(frozen=True, slots=True)
class Call:
    label: str
    url: str
    count: int


CALLS = (
    Call("same network and across (echo: 1 pod in cluster1, 3 behind cluster2's gateway)",
         "http://echo.default.svc.cluster.local/", 8),
    Call("across networks (ratings: only in cluster2)", "http://ratings.default.svc.cluster.local:9080/", 4),
    Call("through cluster1's waypoint to cluster2 (reviews)", "http://reviews.default.svc.cluster.local:9080/", 4),
)  # fmt: skip


async def send(mesh: Mesh, scale: int = 1) -> list[tuple[Call, list[str]]]:
    """Run every call `count * scale` times; returns the first word of each answer (the pod that served it)."""
    out = []
    for call in CALLS:
        results = await asyncio.gather(*(mesh.curl("sleep", call.url) for _ in range(call.count * scale)))
        out.append((call, [r.text.split()[0] if r.ok else f"error({r.returncode})" for r in results]))
    return out
