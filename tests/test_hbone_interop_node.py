"""Interop with an independent HTTP/2 implementation: Node.js's `http2` as HBONE client and as server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hbone.client import dial
from tests.support.apps import TcpApp, TunnelServer, echo, pattern, stream_pair
from tests.support.pki import TestPki, ident

PEER = Path(__file__).parent / "interop" / "hbone_peer.mjs"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (make test installs nodejs)")

SERVER = ident("server")
NODE_ID = ident("node-peer")


async def test_node_client_against_our_server(pki: TestPki, tmp_path: Path) -> None:
    pki.cert(NODE_ID).write(tmp_path)
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER, "cluster2")).start()
    app = await TcpApp(echo).start()
    size = 24 * 1024 * 1024 + 5
    proc = await asyncio.create_subprocess_exec(
        NODE, str(PEER), "client", str(tmp_path), str(server.address[1]), f"127.0.0.1:{app.port}", str(size),
        str(SERVER), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["bytes"] == size
    assert result["sent"] == result["received"]
    assert server.peak_streams_per_connection == 1
    await server.close()
    await app.close()


async def test_our_client_against_node_server(pki: TestPki, tmp_path: Path) -> None:
    pki.cert(NODE_ID, "cluster2").write(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        NODE, str(PEER), "server", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))["port"]
        conn = await dial(("127.0.0.1", port), pki.client_ctx(ident("client")), [NODE_ID])
        tunnel = await conn.open_stream("127.0.0.1:8080", [("baggage", "k8s.cluster.name=cluster1")])
        assert tunnel.header_values("baggage", response=True) == [b"k8s.cluster.name=node"]
        reader, writer = stream_pair(tunnel)
        body = pattern(5, 24 * 1024 * 1024 + 3)
        writer.write(body)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 60)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()
        conn.close()
    finally:
        proc.kill()
        await proc.wait()
