"""Transparent capture (SPEC §2, port 15001): in a network namespace the test creates, an iptables REDIRECT
sends a plain `curl http://<VIP>/` to ztunnel, which reads SO_ORIGINAL_DST and tunnels it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import yaml

from certs import make_mesh_pki
from tests.support.daemons import metric_samples, run_curl, start_app
from tests.support.netns import namespace, sh
from tests.support.ztunnel import workload, ztunnel_daemon
from topology.netns import netns_unavailable_reason

REASON = netns_unavailable_reason() or (None if shutil.which("iptables") else "iptables is not installed")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SLEEP_IP, ECHO_IP, VIP, Z1, Z2 = "198.18.1.10", "198.18.2.10", "198.18.9.1", "198.18.1.1", "198.18.2.1"
ECHO_HOST = "echo.default.svc.cluster.local"


def config() -> dict:
    def labelled(name: str, ip: str, node: str, services: dict) -> dict:
        short = name.split("-")[0]
        return workload(name, ip, node=node, network=None, uid=f"c1/{name}", workloadName=short, canonicalName=short,
                        services=services)  # fmt: skip

    return {
        "workloads": [
            labelled("sleep-1", SLEEP_IP, "node1", {}),
            labelled("echo-1", ECHO_IP, "node2", {f"default/{ECHO_HOST}": {80: 8080}}),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": ECHO_HOST,
                "vips": [f"/{VIP}"],
                "ports": {80: 8080},
                "subjectAltNames": ["spiffe://cluster.local/ns/default/sa/echo"],
            }
        ],
    }


async def test_iptables_redirect_is_captured_and_tunnelled(tmp_path: Path) -> None:
    pki = make_mesh_pki(tmp_path / "pki", ["cluster1"])
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config()))
    with namespace("ztcap", [SLEEP_IP, ECHO_IP, Z1, Z2]) as ns:
        # Only connections to service VIPs are captured, so ztunnel's own HBONE traffic is not.
        sh(
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "198.18.9.0/24",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
            ns=ns,
        )
        prefix = ["ip", "netns", "exec", ns]
        app = await start_app("echo-1", ECHO_IP, 8080, tmp_path / "app.log", prefix=tuple(prefix))
        daemons = []
        try:
            for node, ip, outbound in (("node1", Z1, "0.0.0.0:15001"), ("node2", Z2, "off")):
                daemon = ztunnel_daemon(ip, path, pki["cluster1"], tmp_path / f"{node}.log", prefix=prefix,
                                        NODE_NAME=node, SOCKS5_ADDR="off", OUTBOUND_ADDR=outbound)  # fmt: skip
                daemons.append(daemon.start())
            await asyncio.gather(*(d.wait_ready() for d in daemons))
            code, out, err = await run_curl("--interface", SLEEP_IP, f"http://{VIP}/", prefix=tuple(prefix))
            assert code == 0, err.decode() + daemons[0].logs()
            assert out.startswith(b"echo-1 ")
            code, metrics, _ = await run_curl(f"http://{Z1}:15020/metrics", prefix=tuple(prefix))
            (labels, value), *_ = metric_samples(metrics.decode(), "istio_tcp_connections_opened_total")
            assert value == 1
            assert labels["source_workload"] == "sleep" and labels["destination_workload"] == "echo"
            assert labels["connection_security_policy"] == "mutual_tls"
        finally:
            for d in daemons:
                d.stop()
            app.stop()
