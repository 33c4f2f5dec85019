"""The launcher: a topology's apps start in their namespaces (or on loopback), answer, and all is cleaned up.

With the three daemons present, a short smoke run of the whole two-network mesh goes through them too.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from topology import netns
from topology.launch import LaunchError, Mesh, _http_get

EXAMPLES = Path(__file__).resolve().parent.parent / "topology" / "examples"
TWO = EXAMPLES / "two-networks.yaml"
DAEMONS_PRESENT = all(importlib.util.find_spec(f"{m}.__main__") for m in ("ztunnel_py", "waypoint_py", "ewgateway_py"))


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("mode", ["auto", "loopback"])
async def test_apps_start_answer_and_stop(mode: str, tmp_path: Path) -> None:
    mesh = Mesh(TWO, tmp_path, mode=mode, daemons=False)  # type: ignore[arg-type]
    async with mesh:
        if mode == "auto" and netns.netns_unavailable_reason() is None:
            assert mesh.mode == "netns"
        assert mesh.mode == ("loopback" if mode == "loopback" else mesh.mode)
        apps = [p for p in mesh.processes.values() if p.kind == "app"]
        assert len(apps) == 7  # sleep, echo-v1, 3 x echo-v2, reviews-v1, ratings-v1
        for p in apps:
            pod = mesh.pod(p.name)
            result = await _http_get(mesh.ns_of_pod(pod), str(pod.ip), 8080, "/")
            assert result.text == f"{pod.name} {pod.cluster} {mesh.app_spec(pod).version} {pod.ip}\n"
        assert (tmp_path / "config" / "cluster1.yaml").exists() and (tmp_path / "pki" / "cluster2").is_dir()
        assert "echo.default.svc.cluster.local" in mesh.addresses()
        argv = mesh.curl_argv("sleep", "http://echo.default.svc.cluster.local/")
        assert "--socks5-hostname" in argv and str(mesh.pod("sleep").ip) in argv
        made = set(mesh.sandbox.namespaces())
        assert made <= namespaces()
        await mesh.restart("cluster2/echo-v2-1")
        assert mesh.process("cluster2/echo-v2-1").previous_exits == [0]
        assert not mesh.unexpected_exits()
    assert all(p.proc is not None and p.proc.returncode is not None for p in mesh.processes.values())
    assert not made & namespaces()


async def test_a_process_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    mesh = Mesh(TWO, tmp_path, mode="loopback", daemons=False, python="/bin/false")
    with pytest.raises(LaunchError, match=r"exited with status 1 while starting; its log .* ends with:\n"):
        await mesh.start()
    assert all(p.proc is None or p.proc.returncode is not None for p in mesh.processes.values())


def test_lookups_name_what_exists(tmp_path: Path) -> None:
    mesh = Mesh(TWO, tmp_path, mode="loopback", daemons=False)
    mesh._prepare()
    try:
        assert mesh.pod("echo-v2").name == "echo-v2-0"
        assert mesh.pod("cluster2/echo-v2-2").name == "echo-v2-2"
        assert mesh.daemon("cluster1/ztunnel").name == "cluster1/ztunnel/node1"
        assert mesh.daemon("cluster2/gateway").name == "cluster2/gateway/eastwest"
        with pytest.raises(KeyError, match="no app 'nope'"):
            mesh.pod("nope")
        with pytest.raises(KeyError, match="several daemons"):
            mesh.daemon("cluster1")
        targets = mesh.scrape_targets()
        assert len(targets) == 6 and all(t.endswith(":15020") for t in targets.values())
    finally:
        mesh.sandbox.close()


@pytest.mark.skipif(not DAEMONS_PRESENT, reason="ztunnel_py, waypoint_py and ewgateway_py are not all runnable yet")
async def test_two_network_mesh_smoke(tmp_path: Path) -> None:
    async with Mesh(TWO, tmp_path, baggage=True) as mesh:
        # One local endpoint (capacity 1) against three remote ones (capacity 3): a connection goes local one time
        # in four, so a dozen tries miss it 3 % of the time. Up to 80 tries (a miss then: 1 in 10^10).
        seen = set()
        for _ in range(80):
            result = (await mesh.curl("sleep", "http://echo.default.svc.cluster.local/", timeout=10)).check()
            seen.add(result.text.split()[1])
            if seen == {"cluster1", "cluster2"}:
                break
        assert seen == {"cluster1", "cluster2"}
        for url in ("http://ratings.default.svc.cluster.local:9080/", "http://reviews.default.svc.cluster.local:9080/"):
            assert (await mesh.curl("sleep", url, timeout=10)).check().text.split()[1] == "cluster2"
        assert "istio_tcp_connections_opened_total" in await mesh.scrape("cluster1/ztunnel")
        assert not mesh.unexpected_exits()


async def test_auto_mode_falls_back_to_loopback_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)  # as a non-root user sees it
    async with Mesh(TWO, tmp_path, mode="auto", daemons=False) as mesh:
        assert mesh.mode == "loopback" and "root" in mesh.mode_reason
        assert mesh.sandbox.namespaces() == []
        pod = mesh.pod("cluster2/echo-v2-2")
        assert pod.ip.is_loopback
        assert (await _http_get(None, str(pod.ip), 8080, "/")).text.startswith("echo-v2-2 cluster2 v2 ")
    with pytest.raises(netns.NetnsUnavailable, match="root"):
        await Mesh(TWO, tmp_path, mode="netns", daemons=False).start()
