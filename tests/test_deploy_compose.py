"""deploy/compose.yaml's networking, for real, without Docker: what `docker compose up` would build, in
network namespaces.

Every compose service that owns a network namespace (the nodes, the edges, Prometheus) gets one, joined to
one bridge per compose network with its static addresses, and a default route through the bridge's own
address, as Docker gives it. The node and edge scripts (deploy/compose/*-net.sh) then run in them unchanged;
the init script makes the PKI and configs; every daemon and app runs with its compose command and
environment inside the namespace of the service it names in `network_mode`. Then the README's curl, the
cross-network and waypoint paths, the isolation between the networks, and Prometheus' scrape targets.

Needs root, `ip`, `iptables` and `curl` (skips otherwise, saying which is missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy_files import (
    DEPLOY,
    MESH_DIR,
    REPO,
    console_scripts,
    healthcheck_argv,
    interpolate,
    load_compose,
    netns_owner,
    service_env,
    subnets,
)
from topology import netns

REASON = netns.netns_unavailable_reason() or (None if shutil.which("curl") else "curl is not installed")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot emulate the compose networks: {REASON}")


def ip(*args: str, ns: str | None = None) -> str:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


@dataclass
class ComposeRun:
    """The emulated `docker compose up`: namespaces by owner service, processes by service."""

    compose: dict[str, Any]
    work: Path
    sandbox: netns.NetnsSandbox
    ns: dict[str, str] = field(default_factory=dict)  # owner service -> namespace
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def services(self) -> dict[str, Any]:
        return self.compose["services"]

    def ns_of(self, service: str) -> str:
        return self.ns[netns_owner(self.services, service)]

    def log(self, service: str) -> str:
        path = self.work / "logs" / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, service: str, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """A command inside the service's namespace (`docker compose exec`), with the service's environment."""
        full_env = {"PATH": os.environ["PATH"], **container_env(self.services[service], self.work), **(env or {})}
        return subprocess.run(netns.exec_argv(self.ns_of(service), argv), env=full_env, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def curl(self, service: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return self.run(service, ["curl", "-sS", "--max-time", f"{timeout:g}", *args], timeout=timeout + 5)


def container_env(service: dict[str, Any], work: Path) -> dict[str, str]:
    """The compose environment, with the `mesh` volume's mount point moved to this run's directory."""
    env = service_env(service)
    return {k: v.replace(MESH_DIR, str(work / "mesh")) for k, v in env.items()}


def host_argv(service: dict[str, Any]) -> list[str]:
    """The service's command as it runs here: console scripts and `python` from this interpreter, the
    scripts that compose mounts from deploy/ from the checkout."""
    cmd = [interpolate(str(c)) for c in service["command"]]
    scripts = console_scripts()
    if cmd[0] in scripts:
        return [sys.executable, "-m", scripts[cmd[0]], *cmd[1:]]
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    if cmd[0] == "sh":
        return ["sh", cmd[1].replace("/deploy/", f"{DEPLOY}/"), *cmd[2:]]
    raise AssertionError(f"unexpected command {cmd}")


def build_networks(run: ComposeRun) -> None:
    compose = run.compose
    nets = subnets(compose)
    host = f"{run.sandbox.prefix}-host"
    ip("netns", "add", host)
    run.sandbox.created.append(host)
    ip("link", "set", "lo", "up", ns=host)
    bridges = {}
    for i, (name, net) in enumerate(compose["networks"].items()):
        bridge = f"br{i}"
        gateway = net["ipam"]["config"][0]["gateway"]
        ip("link", "add", bridge, "type", "bridge", ns=host)
        ip("addr", "add", f"{gateway}/{nets[name].prefixlen}", "dev", bridge, ns=host)
        ip("link", "set", bridge, "up", ns=host)
        bridges[name] = (bridge, gateway)
    port = 0
    for i, (name, svc) in enumerate(run.services.items()):
        if "networks" not in svc:
            continue
        ns = f"{run.sandbox.prefix}-s{i}"
        ip("netns", "add", ns)
        run.sandbox.created.append(ns)
        run.ns[name] = ns
        ip("link", "set", "lo", "up", ns=ns)
        for k, (net, cfg) in enumerate(svc["networks"].items()):
            port += 1
            bridge, gateway = bridges[net]
            ip("link", "add", f"eth{k}", "type", "veth", "peer", "name", f"p{port}", "netns", host, ns=ns)
            ip("link", "set", f"p{port}", "master", bridge, "up", ns=host)
            ip("addr", "add", f"{cfg['ipv4_address']}/{nets[net].prefixlen}", "dev", f"eth{k}", ns=ns)
            ip("link", "set", f"eth{k}", "up", ns=ns)
            if k == 0:
                ip("route", "add", "default", "via", gateway, ns=ns)  # as Docker does
        for key, value in (svc.get("sysctls") or {}).items():
            subprocess.run(netns.exec_argv(ns, ["sysctl", "-qw", f"{key}={value}"]), check=True, timeout=30)


def start(run: ComposeRun, service: str, extra_env: dict[str, str] | None = None) -> None:
    svc = run.services[service]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           **container_env(svc, run.work), **(extra_env or {})}  # fmt: skip
    log = open(run.work / "logs" / f"{service}.log", "wb")  # noqa: SIM115 - the child holds it
    run.procs[service] = subprocess.Popen(netns.exec_argv(run.ns_of(service), host_argv(svc)), env=env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=run.work)  # fmt: skip
    log.close()


def wait_until(what: str, check: Any, run: ComposeRun, service: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        proc = run.procs.get(service)
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{service} exited with {proc.returncode} before {what}:\n{run.log(service)[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"{service}: no {what} after {timeout:g}s:\n{run.log(service)[-3000:]}")


@pytest.fixture(scope="module")
def compose_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeRun]:
    work = tmp_path_factory.mktemp("compose")
    (work / "logs").mkdir()
    netns.sweep_stale()
    sandbox = netns.NetnsSandbox(f"amb{os.getpid()}x{next(netns._counter)}")
    run = ComposeRun(load_compose(), work, sandbox)
    try:
        build_networks(run)
        services = run.services
        # init (network_mode: none): the PKI and the configs into the `mesh` volume
        init = subprocess.run(["sh", str(DEPLOY / "compose" / "init.sh")], capture_output=True, text=True,
                              env={**os.environ, "MESH_DIR": str(work / "mesh"), "PYTHON": sys.executable,
                                   "TOPOLOGY": str(DEPLOY / "topology.yaml"), "PYTHONPATH": str(REPO)},
                              timeout=120, check=False)  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        # the namespaces' own setup (compose waits for their healthcheck: the ready file)
        holders = [n for n, s in services.items() if s.get("command", [""])[0] == "sh" and n != "init"]
        for name in holders:
            ready = work / f"{name}.ready"
            start(run, name, {"READY_FILE": str(ready)})
        for name in holders:
            wait_until("network set up", (work / f"{name}.ready").exists, run, name)
        # daemons and apps, in the namespace their network_mode names
        for name, svc in services.items():
            if name in holders or name == "init" or svc["image"].startswith("prom/"):
                continue
            start(run, name)
        for name, svc in services.items():
            env = container_env(svc, work)
            if "READINESS_ADDR" in env:
                hc = [sys.executable, *healthcheck_argv()[1:]]

                def healthy(name: str = name, hc: list[str] = hc) -> bool:
                    return run.run(name, hc, timeout=10).returncode == 0

                wait_until("healthy HEALTHCHECK", healthy, run, name)
        yield run
    finally:
        for proc in run.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in run.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        sandbox.close()


def who_answered(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr}"
    return result.stdout.split()[0]


def test_the_readme_curl_reaches_echo_in_both_networks(compose_up: ComposeRun) -> None:
    """`docker compose exec sleep curl http://echo.default.svc.cluster.local/`, with sleep's ALL_PROXY."""
    seen = {who_answered(compose_up.curl("sleep", "http://echo.default.svc.cluster.local/")) for _ in range(40)}
    assert "echo-v1-0" in seen, seen  # same network: pod to pod
    assert seen & {"echo-v2-0", "echo-v2-1", "echo-v2-2"}, seen  # the other network, through its gateway


def test_cross_network_and_waypoint_paths(compose_up: ComposeRun) -> None:
    socks = service_env(compose_up.services["sleep"])["ALL_PROXY"].removeprefix("socks5h://")
    ratings = compose_up.curl("sleep", "--socks5-hostname", socks, "http://ratings.default.svc.cluster.local:9080/")
    assert who_answered(ratings) == "ratings-v1-0"  # only in cluster2: double HBONE through its gateway
    reviews = compose_up.curl("sleep", "http://reviews.default.svc.cluster.local:9080/", "-D", "-")
    assert "reviews-v1-0" in reviews.stdout, reviews.stdout + reviews.stderr  # cluster1's waypoint, then cluster2
    metrics = compose_up.run("prometheus", ["curl", "-sS", "http://10.244.1.2:15020/metrics"]).stdout
    assert 'destination_workload="reviews-v1"' in metrics, "the request went through cluster1's waypoint"


def test_cross_network_metrics_name_both_ends(compose_up: ComposeRun) -> None:
    """What the compose file shows in Prometheus: with AMBIENT_ENABLE_BAGGAGE (its default there), the
    destination ztunnel in cluster2 names the caller in cluster1, though the call came through a gateway."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        who_answered(compose_up.curl("sleep", "http://ratings.default.svc.cluster.local:9080/"))
    text = compose_up.run("prometheus", ["curl", "-sS", "http://10.245.1.1:15020/metrics"]).stdout
    edges = {
        (
            s.labels["reporter"],
            s.labels["source_workload"],
            s.labels["source_cluster"],
            s.labels["destination_workload"],
        )
        for family in text_string_to_metric_families(text)
        if family.name == "istio_tcp_connections_opened"
        for s in family.samples
    }
    assert ("destination", "sleep", "cluster1", "ratings-v1") in edges, edges


def test_networks_are_isolated_but_for_the_gateways(compose_up: ComposeRun) -> None:
    # A cluster1 pod cannot reach a cluster2 pod, nor the transit link, directly.
    direct = compose_up.curl("sleep", "--noproxy", "*", "http://10.245.1.3:8080/", timeout=2)
    assert direct.returncode != 0, direct.stdout
    link = compose_up.curl("sleep", "--noproxy", "*", "http://198.19.0.2:15020/", timeout=2)
    assert link.returncode != 0, link.stdout
    # From the transit link, even with a route into network1, only answers get through cluster1's edge.
    ip("route", "add", "10.244.0.0/16", "via", "198.18.0.1", ns=compose_up.ns["cluster2-edge"])
    try:
        inward = compose_up.curl("cluster2-edge", "--noproxy", "*", "http://10.244.1.4:8080/", timeout=2)
        assert inward.returncode != 0, inward.stdout
    finally:
        ip("route", "del", "10.244.0.0/16", ns=compose_up.ns["cluster2-edge"])
    # ... while the gateway itself answers on its public address.
    dial = "import socket; socket.create_connection(('198.18.0.2', 15008), 3)"
    hbone = compose_up.run("cluster1-node", [sys.executable, "-c", dial])
    assert hbone.returncode == 0, hbone.stderr


def test_prometheus_reaches_every_target(compose_up: ComposeRun) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    for target in targets:
        result = compose_up.run("prometheus", ["curl", "-sS", "--max-time", "5", f"http://{target}/metrics"])
        assert result.returncode == 0 and "# TYPE" in result.stdout, f"{target}: {result.stderr}"
    # And no further: Prometheus sits on both networks but forwards nothing.
    nets = subnets(compose_up.compose)
    assert all(isinstance(n, IPv4Network) for n in nets.values())
    forward = compose_up.run("prometheus", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert forward == "0"


def test_daemons_stop_cleanly(compose_up: ComposeRun) -> None:
    """`docker compose stop` sends SIGTERM; every daemon and app exits 0 within Docker's 10 s grace."""
    order = [n for n in compose_up.procs if compose_up.services[n]["command"][0] != "sh"]
    for name in order:
        compose_up.procs[name].send_signal(signal.SIGTERM)
    for name in order:
        with contextlib.suppress(subprocess.TimeoutExpired):
            compose_up.procs[name].wait(10)
        assert compose_up.procs[name].returncode == 0, f"{name}:\n{compose_up.log(name)[-2000:]}"
