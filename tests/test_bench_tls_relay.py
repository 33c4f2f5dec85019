"""The TLS relay pair that the ztunnel benchmark reports as the floor of a Python TLS proxy pair must really
relay every byte, over real mutual TLS: a figure from a pair that dropped bytes or spoke plaintext would be
meaningless."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

from bench.pki import BenchPki
from bench.procs import free_port
from tests.support.apps import TcpApp, echo
from tests.support.waiting import eventually


async def _start(role: str, listen: int, connect: str, certs: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.workers.tls_relay", "--role", role, "--listen", f"127.0.0.1:{listen}",
        "--connect", connect, "--certs", str(certs),
    )  # fmt: skip


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        return await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None


async def _listening(port: int) -> bool:
    opened = await _connect(port)
    if opened is not None:
        opened[1].close()
    return opened is not None


async def test_pair_relays_every_byte_over_mutual_tls(tmp_path: Path) -> None:
    pki = BenchPki(tmp_path / "pki")
    accepted: list[int] = []

    async def counted_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        accepted.append(1)
        return await echo(reader, writer)

    app = await TcpApp(counted_echo).start()
    server_port, client_port = free_port(), free_port()
    procs = [
        await _start("server", server_port, f"127.0.0.1:{app.port}", pki.issue("relay-server").folder),
        await _start("client", client_port, f"127.0.0.1:{server_port}", pki.issue("relay-client").folder),
    ]
    try:
        # (A connection to the client side would open one to the application: only the TLS side is probed.)
        await eventually(lambda: _listening(server_port), "the TLS side listening", 20)
        # The TLS side refuses plaintext: an HTTP request sent to it straight never reaches the application.
        reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" and not accepted
        writer.close()
        # Through the pair: 4 MiB of random bytes come back whole from the echo behind it.
        payload = os.urandom(4 << 20)
        reader, writer = await eventually(lambda: _connect(client_port), "the client side listening", 20)
        writer.write(payload)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        writer.close()
        assert len(accepted) == 1
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
        await app.close()
