"""`make demo` runs in the suite, and its table says what the flag changes; a real Prometheus reads the
mesh's metrics with PromQL."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from demo.edges import from_prometheus
from demo.prometheus import BINARY as PROMETHEUS
from demo.prometheus import Prometheus
from demo.traffic import send
from tests.support.waiting import eventually
from topology.launch import Mesh

REPO = Path(__file__).resolve().parents[1]
TWO = REPO / "topology" / "examples" / "two-networks.yaml"


def table_rows(output: str, flag: str) -> list[list[str]]:
    """The rows of the table printed for AMBIENT_ENABLE_BAGGAGE=<flag>, split into columns."""
    section = output.split(f"Who talked to whom, AMBIENT_ENABLE_BAGGAGE={flag}", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.endswith("with an unknown peer"):
            break
        cols = line.split()
        if "->" in cols:
            rows.append(cols)
    return rows


def test_demo_prints_the_difference_the_flag_makes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "demo", "--workdir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    off, on = table_rows(out, "off"), table_rows(out, "on")
    assert off and on
    # Off: the destination ztunnel in cluster2 cannot name the caller from network1, nor the source ztunnel
    # the pod it reached through the gateway.
    assert any(r[0] == "cluster2/ztunnel/node2" and r[2] == "unknown@unknown" and r[4] == "ratings-v1@cluster2"
               for r in off)  # fmt: skip
    assert any(r[0] == "cluster1/ztunnel/node1" and r[1] == "source" and r[4] == "unknown@unknown" for r in off)
    # On: both ends are named, on every daemon that saw the call, including the waypoint's L7 view.
    assert ["cluster2/ztunnel/node2", "destination", "sleep@cluster1", "->", "ratings-v1@cluster2"] in [
        r[:5] for r in on
    ]
    assert ["cluster1/ztunnel/node1", "source", "sleep@cluster1", "->", "ratings-v1@cluster2"] in [r[:5] for r in on]
    assert ["cluster1/waypoint/waypoint", "waypoint", "sleep@cluster1", "->", "reviews-v1@cluster2", "requests",
            "4"] in [r[:7] for r in on]  # fmt: skip
    assert not any("unknown@" in " ".join(r) for r in on)
    assert re.search(r"(\d+) edges have an 'unknown' peer with baggage off, 0 with it on", out)
    assert "everything it started is stopped" in out


@pytest_asyncio.fixture(loop_scope="function")
async def mesh(tmp_path: Path):
    async with Mesh(TWO, tmp_path / "mesh", baggage=True) as mesh:
        yield mesh


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make test installs it)")
async def test_prometheus_reads_the_edges_with_promql(mesh: Mesh, tmp_path: Path) -> None:
    prom = Prometheus(mesh, tmp_path / "prometheus")
    await prom.start()
    try:
        await send(mesh)
        keys = ("source_workload", "source_cluster", "destination_workload", "destination_cluster")
        want_edges = {("sleep", "cluster1", "reviews-v1", "cluster2"): 4.0}

        async def scraped() -> tuple[list[dict], dict] | None:
            """Every target up and the traffic's last counters in: the same queries the assertions read."""
            up = await prom.query("up")
            http = await prom.query(
                "sum by (source_workload, source_cluster, destination_workload, destination_cluster) "
                "(istio_requests_total)"
            )
            tcp = await prom.query(
                'sum by (source_workload, destination_workload) '
                '(istio_tcp_connections_opened_total{reporter="destination", destination_cluster="cluster2"})'
            )  # fmt: skip
            edges = {tuple(r["metric"][k] for k in keys): float(r["value"][1]) for r in http}
            pairs = {(r["metric"]["source_workload"], r["metric"]["destination_workload"]) for r in tcp}
            done = {r["metric"]["daemon"] for r in up} == set(mesh.scrape_targets()) and all(
                r["value"][1] == "1" for r in up
            )
            done = done and {("sleep", "ratings-v1"), ("waypoint", "reviews-v1")} <= pairs
            return (up, edges) if done and edges == want_edges else None

        up, edges = await eventually(scraped, "Prometheus scrapes every target after the traffic", deadline=30)
        assert {r["metric"]["daemon"] for r in up} == set(mesh.scrape_targets())
        assert all(r["value"][1] == "1" for r in up)
        assert edges == {("sleep", "cluster1", "reviews-v1", "cluster2"): 4.0}
        tcp = await prom.query(
            'sum by (source_workload, source_cluster, destination_workload, destination_cluster) '
            '(istio_tcp_connections_opened_total{reporter="destination", destination_cluster="cluster2"})'
        )  # fmt: skip
        pairs = {(r["metric"]["source_workload"], r["metric"]["destination_workload"]) for r in tcp}
        assert ("sleep", "ratings-v1") in pairs and ("waypoint", "reviews-v1") in pairs
        sent = await prom.query('sum(istio_tcp_sent_bytes_total{reporter="destination"}) > 0')
        assert sent
        assert await from_prometheus(prom)
    finally:
        await prom.stop()
    await asyncio.sleep(0)
