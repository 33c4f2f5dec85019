"""Real isolated networks: namespaces come and go, pod ranges overlap, only gateways cross networks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from topology import netns
from topology.addressing import AddressPlan, plan_addresses
from topology.loader import load_topology
from topology.netns import NetnsSandbox, build_netns, open_connection, start_server

EXAMPLES = Path(__file__).resolve().parent.parent / "topology" / "examples"
REPO = EXAMPLES.parent.parent

REASON = netns.netns_unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")

PORT = 17777


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def addresses_in(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-4", "addr"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def two_networks() -> Iterator[tuple[AddressPlan, NetnsSandbox]]:
    plan = plan_addresses(load_topology(EXAMPLES / "two-networks.yaml"), "netns")
    with build_netns(plan) as sandbox:
        yield plan, sandbox


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello")
    await writer.drain()
    writer.close()


async def say_hello(ns: str, host: str) -> bytes:
    reader, writer = await open_connection(ns, host, PORT, timeout=1.0)
    try:
        return await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()


@needs_netns
def test_namespaces_appear_and_disappear() -> None:
    plan = plan_addresses(load_topology(EXAMPLES / "two-networks.yaml"), "netns")
    sandbox = build_netns(plan)
    try:
        made = set(sandbox.namespaces())
        assert made <= namespaces()
        assert all(ns.startswith(f"amb{os.getpid()}x") for ns in made)
        # nodes, network edges, transit and management
        assert len(made) == 2 + 2 + 1 + 1
        for ns in made:
            assert "lo: <LOOPBACK,UP" in subprocess.run(["ip", "-n", ns, "link", "show", "lo"], capture_output=True,
                                                        text=True, check=True).stdout  # fmt: skip
    finally:
        sandbox.close()
    assert not made & namespaces()
    sandbox.close()  # idempotent


@needs_netns
def test_overlapping_pod_ips_exist_in_both_networks(two_networks: tuple[AddressPlan, NetnsSandbox]) -> None:
    plan, sandbox = two_networks
    node1 = sandbox.node_ns[("cluster1", "node1")]
    node2 = sandbox.node_ns[("cluster2", "node2")]
    ips1 = {str(p.ip) for p in plan.pods if p.network == "network1"}
    ips2 = {str(p.ip) for p in plan.pods if p.network == "network2"}
    shared = ips1 & ips2
    assert "10.244.1.3" in shared
    for ip in shared:
        assert f"inet {ip}/16" in addresses_in(node1)
        assert f"inet {ip}/16" in addresses_in(node2)


@needs_netns
async def test_pods_of_another_network_are_unreachable_but_its_gateway_is(
    two_networks: tuple[AddressPlan, NetnsSandbox],
) -> None:
    plan, sandbox = two_networks
    node1 = sandbox.node_ns[("cluster1", "node1")]
    node2 = sandbox.node_ns[("cluster2", "node2")]
    only_in_2 = next(p for p in plan.pods if p.network == "network2" and
                     all(q.ip != p.ip for q in plan.pods if q.network == "network1"))  # fmt: skip
    overlapping = next(p for p in plan.pods if p.network == "network2" and
                       any(q.ip == p.ip for q in plan.pods if q.network == "network1"))  # fmt: skip
    servers = [
        await start_server(node2, hello, str(only_in_2.ip), PORT),
        await start_server(node2, hello, str(overlapping.ip), PORT),
        await start_server(sandbox.edge_ns["network2"], hello, str(plan.transit["network2"]), PORT),
    ]
    try:
        # Inside network2 both pods answer.
        assert await say_hello(node2, str(only_in_2.ip)) == b"hello"
        assert await say_hello(node2, str(overlapping.ip)) == b"hello"
        # From network1: a network2-only pod IP leads nowhere (no route out but the transit range)...
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OSError):
            await say_hello(node1, str(only_in_2.ip))
        assert loop.time() - started < 3
        # ...and an overlapping IP is network1's own pod, where nothing listens: network2's server is not hit.
        with pytest.raises(ConnectionRefusedError):
            await say_hello(node1, str(overlapping.ip))
        # The gateway address of network2 is reachable from network1.
        assert await say_hello(node1, str(plan.transit["network2"])) == b"hello"
    finally:
        for s in servers:
            s.close()


@needs_netns
async def test_same_network_clusters_reach_each_others_pods() -> None:
    plan = plan_addresses(load_topology(EXAMPLES / "single-network.yaml"), "netns")
    with build_netns(plan) as sandbox:
        assert sandbox.transit_ns is None  # one network: nothing to cross
        pod2 = next(p for p in plan.pods if p.cluster == "cluster2")
        server = await start_server(sandbox.node_ns[("cluster2", "node2")], hello, str(pod2.ip), PORT)
        try:
            assert await say_hello(sandbox.node_ns[("cluster1", "node1")], str(pod2.ip)) == b"hello"
        finally:
            server.close()


@needs_netns
async def test_management_network_reaches_every_daemon_address(
    two_networks: tuple[AddressPlan, NetnsSandbox],
) -> None:
    plan, sandbox = two_networks
    assert sandbox.mgmt_ns is not None
    servers = [await start_server(sandbox.ns_for(d.location), hello, str(d.mgmt_ip), PORT) for d in plan.daemons]
    try:
        for d in plan.daemons:
            assert await say_hello(sandbox.mgmt_ns, str(d.mgmt_ip)) == b"hello"
    finally:
        for s in servers:
            s.close()


@needs_netns
def test_failed_build_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_addresses(load_topology(EXAMPLES / "two-networks.yaml"), "netns")
    before = namespaces()

    def explode(self: object, ns: str) -> None:
        raise netns.NetnsError("boom")

    monkeypatch.setattr(netns._Builder, "edge_firewall", explode)
    with pytest.raises(netns.NetnsError, match="boom"):
        build_netns(plan)
    assert namespaces() == before


@needs_netns
def test_stale_namespaces_of_dead_runs_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"amb{dead.pid}x0-leftover"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.sweep_stale()
        assert name not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_removes_its_namespaces(sig: int) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from topology.addressing import plan_addresses
        from topology.loader import load_topology
        from topology.netns import build_netns
        plan = plan_addresses(load_topology({str(EXAMPLES / "two-networks.yaml")!r}), "netns")
        with build_netns(plan) as sandbox:
            print(sandbox.prefix, flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix and any(ns.startswith(prefix + "-") for ns in namespaces())
        child.send_signal(sig)
        child.wait(timeout=20)
    finally:
        child.kill()
    assert not [ns for ns in namespaces() if ns.startswith(prefix + "-")]


def test_unavailable_reason_is_clear_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsUnavailable, match="need root"):
        netns.check_available()
