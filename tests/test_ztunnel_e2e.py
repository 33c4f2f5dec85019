"""Two ztunnels ("node1", "node2") as real processes on loopback, a real curl through SOCKS5."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from certs import make_mesh_pki
from tests.support.daemons import Daemon, http_get, metric_samples, run_curl, scrape, start_app
from tests.support.waiting import eventually
from tests.support.ztunnel import SOCKS5_NO_AUTH, socks_connect, workload, ztunnel_daemon
from topology.app import pattern_sha256

SLEEP_IP, ECHO_IP, VIP = "127.11.1.10", "127.11.2.10", "127.11.9.1"
LEGACY_IP, OUTSIDE_IP = "127.11.2.20", "127.11.4.1"  # a workload outside the mesh (TCP), and no workload at all
Z1, Z2 = "127.11.1.1", "127.11.2.1"
ECHO_HOST = "echo.default.svc.cluster.local"


def mesh_config(policies: list[dict] | None = None, echo_policies: list[str] | None = None) -> dict:
    def deployment(name: str, ip: str, node: str, services: dict | None = None, **fields: object) -> dict:
        """A workload with a Deployment's labels, outside any named network."""
        short = name.split("-")[0]
        return workload(name, ip, node=node, network=None, workloadName=short, workloadType="deployment",
                        canonicalName=short, canonicalRevision="v1", services=services or {}, **fields)  # fmt: skip

    return {
        "workloads": [
            deployment("sleep-1", SLEEP_IP, "node1"),
            deployment("legacy-1", LEGACY_IP, "node2", protocol="TCP"),
            deployment(
                "echo-1",
                ECHO_IP,
                "node2",
                {f"default/{ECHO_HOST}": {80: 8080}},
                authorizationPolicies=echo_policies or [],
            ),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": ECHO_HOST,
                "vips": [f"/{VIP}"],
                "ports": {80: 8080},
                "subjectAltNames": ["spiffe://cluster.local/ns/default/sa/echo"],
            },
        ],
        "policies": policies or [],
    }


@pytest.fixture
async def mesh(tmp_path: Path):
    pki = make_mesh_pki(tmp_path / "pki", ["cluster1"])
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump(mesh_config()))
    app = await start_app("echo-1", ECHO_IP, 8080, tmp_path / "app.log")
    daemons = []
    for node, ip in (("node1", Z1), ("node2", Z2)):
        log = tmp_path / f"ztunnel-{node}.log"
        daemons.append(ztunnel_daemon(ip, config, pki["cluster1"], log, NODE_NAME=node, DRAIN_DEADLINE="5s").start())
    try:
        await asyncio.gather(*(d.wait_ready() for d in daemons))
        yield {"config": config, "app": app, "ztunnels": daemons, "tmp": tmp_path}
    finally:
        for d in daemons:
            d.stop()
        app.stop()


async def config_dumps() -> list[dict]:
    """Each ztunnel's admin /config_dump (ADMIN_ADDR is <ip>:15000)."""
    texts = await asyncio.gather(*(asyncio.to_thread(http_get, f"http://{ip}:15000/config_dump") for ip in (Z1, Z2)))
    return [json.loads(text) for text in texts]


async def generations() -> list[int]:
    return [dump["stateGeneration"] for dump in await config_dumps()]


async def until_applied(before: list[int]) -> None:
    """Until every ztunnel has taken a new mesh config since `before` (their generations then)."""

    async def applied() -> bool:
        return all(now > then for now, then in zip(await generations(), before, strict=True))

    await eventually(applied, "both ztunnels apply the rewritten mesh.yaml", deadline=10)


def socks(*args: str) -> list[str]:
    return ["--interface", SLEEP_IP, "--socks5-hostname", f"{Z1}:15080", *args]


async def test_curl_by_hostname_and_vip(mesh) -> None:
    for url in (f"http://{ECHO_HOST}/", f"http://{VIP}/"):
        code, out, err = await run_curl(*socks(url))
        assert code == 0, err.decode() + mesh["ztunnels"][0].logs()
        assert out.startswith(b"echo-1 ")


async def test_64mib_download_and_upload_byte_exact(mesh) -> None:
    size = 64 * 1024 * 1024
    code, out, err = await run_curl(*socks(f"http://{ECHO_HOST}/bytes/{size}"))
    assert code == 0, err
    assert len(out) == size and hashlib.sha256(out).hexdigest() == pattern_sha256(size)
    upload = mesh["tmp"] / "upload.bin"
    data = os.urandom(size)
    upload.write_bytes(data)
    code, out, err = await run_curl(
        *socks(
            "--data-binary", f"@{upload}", "-H", "Content-Type: application/octet-stream", f"http://{ECHO_HOST}/sha256"
        )
    )
    assert code == 0, err
    assert out.decode().split() == [hashlib.sha256(data).hexdigest(), str(size)]


async def test_metrics_on_both_sides(mesh) -> None:
    code, _out, err = await run_curl(*socks(f"http://{ECHO_HOST}/bytes/100000"))
    assert code == 0, err
    await asyncio.sleep(0.2)
    src_text = await scrape(f"{Z1}:15020")
    dst_text = await scrape(f"{Z2}:15020")
    (src_labels, opened), *_ = metric_samples(src_text, "istio_tcp_connections_opened_total")
    assert src_labels["reporter"] == "source"
    assert src_labels["source_workload"] == "sleep"
    assert src_labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert src_labels["destination_workload"] == "echo"
    assert src_labels["destination_principal"] == "spiffe://cluster.local/ns/default/sa/echo"
    assert src_labels["destination_service"] == ECHO_HOST
    assert src_labels["source_cluster"] == src_labels["destination_cluster"] == "cluster1"
    assert src_labels["connection_security_policy"] == "mutual_tls"
    assert src_labels["request_protocol"] == "tcp" and src_labels["response_flags"] == "-"
    (dst_labels, _), *_ = metric_samples(dst_text, "istio_tcp_connections_opened_total")
    assert dst_labels["reporter"] == "destination"
    assert dst_labels["source_workload"] == "sleep"
    assert dst_labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert dst_labels["destination_workload"] == "echo"
    assert dst_labels["destination_service"] == ECHO_HOST
    for text in (src_text, dst_text):
        opened = sum(v for _, v in metric_samples(text, "istio_tcp_connections_opened_total"))
        closed = sum(v for _, v in metric_samples(text, "istio_tcp_connections_closed_total"))
        assert opened == closed == 1
        sent = sum(v for _, v in metric_samples(text, "istio_tcp_sent_bytes_total"))
        received = sum(v for _, v in metric_samples(text, "istio_tcp_received_bytes_total"))
        assert 100000 < sent < 101000  # the body plus the response head: server → client
        assert 0 < received < 1000  # the request: client → server
        assert "_created" not in text
        assert 'istio_build{component="ztunnel",tag="0.1.0"} 1.0' in text
        assert metric_samples(text, "istio_tcp_sockets_open") in (
            [],
            [({"reporter": "source"}, 0.0)],
            [({"reporter": "destination"}, 0.0)],
        )


async def test_known_service_without_endpoint_is_refused_and_counted_as_failed(mesh) -> None:
    code, _out, err = await run_curl(*socks(f"http://{ECHO_HOST}:81/"))
    assert code == 97, err  # the SOCKS reply refused the connection
    assert "(4)" in err.decode()  # reply code 4: host unreachable
    assert "has no endpoint for port 81" in mesh["ztunnels"][0].logs()
    text = await scrape(f"{Z1}:15020")
    # Opened carries no flag, like every other connection; closed and failed carry the reason. The
    # service was resolved, so it is named.
    ((opened_labels, opened),) = metric_samples(text, "istio_tcp_connections_opened_total")
    assert opened == 1 and opened_labels["response_flags"] == "-"
    assert opened_labels["destination_service"] == ECHO_HOST
    assert opened_labels["destination_service_name"] == "echo"
    ((failed_labels, failed),) = metric_samples(text, "istio_tcp_connections_failed_total")
    assert failed == 1 and failed_labels["response_flags"] == "CONNECT"
    assert failed_labels["destination_service"] == ECHO_HOST and failed_labels["reporter"] == "source"


async def test_deny_policy_refuses_with_401_and_deny_flag_on_both_sides(mesh) -> None:
    deny = {
        "name": "deny-sleep",
        "namespace": "default",
        "scope": "Namespace",
        "action": "Deny",
        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/sleep"}]}]]],
    }
    config: Path = mesh["config"]
    before = await generations()
    config.write_text(yaml.safe_dump(mesh_config(policies=[deny])))
    await until_applied(before)  # the file is checked once a second
    code, out, _err = await run_curl(*socks(f"http://{ECHO_HOST}/"))
    assert code != 0 and out == b""
    src = await scrape(f"{Z1}:15020")
    dst = await scrape(f"{Z2}:15020")
    for text in (src, dst):
        failed = metric_samples(text, "istio_tcp_connections_failed_total")
        assert [labels["response_flags"] for labels, _ in failed] == ["DENY"]
    assert "refused with 401" in mesh["ztunnels"][1].logs()
    # A client denied again and again: each refusal is counted, the warning about them is rate-limited.
    for _ in range(5):
        code, _out, _err = await run_curl(*socks(f"http://{ECHO_HOST}/"))
        assert code != 0
    ((_, denied),) = metric_samples(await scrape(f"{Z2}:15020"), "istio_tcp_connections_failed_total")
    assert denied == 6 and mesh["ztunnels"][1].logs().count("refused with 401") == 1
    # A missing ALLOW: an ALLOW policy for someone else refuses sleep too.
    allow_other = {
        "name": "allow-other",
        "namespace": "default",
        "scope": "WorkloadSelector",
        "action": "Allow",
        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/other"}]}]]],
    }
    before = await generations()
    config.write_text(yaml.safe_dump(mesh_config(policies=[allow_other], echo_policies=["default/allow-other"])))
    await until_applied(before)
    code, out, _ = await run_curl(*socks(f"http://{ECHO_HOST}/"))
    assert code != 0 and out == b""


async def test_bad_config_is_refused_and_traffic_keeps_flowing(mesh) -> None:
    config: Path = mesh["config"]
    good = config.read_text()
    config.write_text(good.replace("workloadIps:", "workloadIPs:", 1))

    async def refused() -> bool:
        errors = [dump["lastConfigError"] for dump in await config_dumps()]
        return all(e and "workloadIPs" in e for e in errors) and "refused new mesh config" in mesh["ztunnels"][0].logs()

    await eventually(refused, "both ztunnels refuse the bad mesh.yaml", deadline=10)
    logs = mesh["ztunnels"][0].logs()
    assert "refused new mesh config" in logs and "workloadIPs" in logs and str(config) in logs
    code, out, _ = await run_curl(*socks(f"http://{ECHO_HOST}/"))
    assert code == 0 and out.startswith(b"echo-1 ")


async def test_unknown_source_is_refused_with_socks_reply_2(mesh) -> None:
    code, _out, err = await run_curl("--socks5-hostname", f"{Z1}:15080", f"http://{ECHO_HOST}/")
    assert code == 97, err  # curl: the SOCKS proxy refused the connection
    assert "(2)" in err.decode()  # reply code 2: connection not allowed by ruleset
    assert "is not a workload on this node" in mesh["ztunnels"][0].logs()
    # The raw reply, byte for byte.
    reader, writer = await asyncio.open_connection(Z1, 15080)  # from 127.0.0.1: not a workload
    writer.write(SOCKS5_NO_AUTH)
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(socks_connect(VIP, 80))
    assert (await reader.readexactly(10))[:2] == b"\x05\x02"
    writer.close()


async def socks_get(path: str = "/") -> bytes:
    """One SOCKS5 connection from the sleep pod's IP, one HTTP request, then close."""
    reader, writer = await asyncio.open_connection(Z1, 15080, local_addr=(SLEEP_IP, 0))
    try:
        writer.write(SOCKS5_NO_AUTH)
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(socks_connect(ECHO_HOST.encode(), 80))
        answer = await reader.readexactly(10)
        assert answer[1] == 0, answer
        writer.write(f"GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n".encode())
        return await reader.read()
    finally:
        writer.close()


async def test_10000_short_connections_leak_nothing(mesh) -> None:
    async def dump(ip: str) -> dict:
        import json

        from tests.support.daemons import http_get

        return json.loads(await asyncio.to_thread(http_get, f"http://{ip}:15000/config_dump"))

    await socks_get()  # warm up: pooled connection, certificates
    before = [await dump(ip) for ip in (Z1, Z2)]
    sem = asyncio.Semaphore(32)

    async def one() -> bool:
        async with sem:
            return b"\r\n\r\necho-1 " in await socks_get()

    results = await asyncio.gather(*(one() for _ in range(10_000)))
    assert all(results)
    await asyncio.sleep(0.5)
    after = [await dump(ip) for ip in (Z1, Z2)]
    for b, a in zip(before, after, strict=True):
        assert a["openFds"] <= b["openFds"] + 2, (b, a)
        assert a["tasks"] <= b["tasks"] + 2, (b, a)
    for ip in (Z1, Z2):
        text = await scrape(f"{ip}:15020")
        assert all(v == 0 for _, v in metric_samples(text, "istio_tcp_sockets_open"))
        opened = sum(v for _, v in metric_samples(text, "istio_tcp_connections_opened_total"))
        assert opened == 10_001  # and the warm-up


async def test_sigterm_drains_open_connections(mesh) -> None:
    """SIGTERM on the destination ztunnel: a download in flight finishes; then the process exits 0."""
    size = 32 * 1024 * 1024
    download = asyncio.create_task(run_curl(*socks("--limit-rate", "16M", f"http://{ECHO_HOST}/bytes/{size}")))
    await asyncio.sleep(0.5)
    node2 = mesh["ztunnels"][1]
    node2.env["DRAIN_DEADLINE"] = "5s"
    node2.proc.send_signal(__import__("signal").SIGTERM)
    code, out, err = await download
    assert code == 0, err
    assert hashlib.sha256(out).hexdigest() == pattern_sha256(size)
    assert await asyncio.to_thread(node2.proc.wait, 10) == 0
    assert "draining" in node2.logs()


async def test_tcp_workload_and_unknown_destination_go_in_plain_tcp(mesh, tmp_path: Path) -> None:
    legacy = await start_app("legacy-1", LEGACY_IP, 8080, tmp_path / "legacy.log")
    outside = await start_app("outside", OUTSIDE_IP, 8080, tmp_path / "outside.log")
    try:
        for ip, name in ((LEGACY_IP, b"legacy-1 "), (OUTSIDE_IP, b"outside ")):
            code, out, err = await run_curl(*socks(f"http://{ip}:8080/"))
            assert code == 0, err
            assert out.startswith(name)
        text = await scrape(f"{Z1}:15020")
        plain = metric_samples(text, "istio_tcp_connections_opened_total")
        by_dest = {labels["destination_workload"]: labels for labels, _ in plain}
        assert by_dest["legacy"]["connection_security_policy"] == "unknown"
        assert by_dest["legacy"]["source_principal"] == "unknown"  # no mTLS, so no principal
        assert by_dest["unknown"]["connection_security_policy"] == "unknown"  # passthrough
        # Nothing reached node2's ztunnel: plain TCP goes straight to the workload.
        assert metric_samples(await scrape(f"{Z2}:15020"), "istio_tcp_connections_opened_total") == []
    finally:
        legacy.stop()
        outside.stop()


async def test_dedicated_mode_needs_no_source_address(mesh, tmp_path: Path) -> None:
    """PROXY_WORKLOAD_INFO: the proxy acts as one workload, whatever address the application connects from."""
    env = {
        **mesh["ztunnels"][0].env,
        "NODE_NAME": "",
        "PROXY_WORKLOAD_INFO": "default/sleep-1/sleep",
        "SOCKS5_ADDR": "127.11.5.1:15080",
        "STATS_ADDR": "127.11.5.1:15020",
        "READINESS_ADDR": "127.11.5.1:15021",
        "ADMIN_ADDR": "127.11.5.1:15000",
        "INBOUND_ADDR": "127.11.5.1:15008",
        "INBOUND_PLAINTEXT_ADDR": "off",
    }
    dedicated = Daemon("ztunnel_py", env, tmp_path / "dedicated.log", "127.11.5.1:15021").start()
    try:
        await dedicated.wait_ready()
        code, out, err = await run_curl("--socks5-hostname", "127.11.5.1:15080", f"http://{ECHO_HOST}/")
        assert code == 0, err.decode() + dedicated.logs()
        assert out.startswith(b"echo-1 ")
        (labels, _), *_ = metric_samples(await scrape("127.11.5.1:15020"), "istio_tcp_connections_opened_total")
        assert labels["source_workload"] == "sleep"
    finally:
        dedicated.stop()
