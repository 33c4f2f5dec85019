"""A real Prometheus server (Debian's `prometheus`) scraping every daemon, queried with PromQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import urllib.parse
from pathlib import Path

import yaml

from topology.launch import Mesh

BINARY = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Runs where the stats endpoints are reachable (the management namespace, or the host on loopback)."""

    def __init__(self, mesh: Mesh, workdir: Path) -> None:
        self.mesh = mesh
        self.workdir = workdir
        self.port = _free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert BINARY is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": name,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target], "labels": {"daemon": name}}],
                }
                for name, target in sorted(self.mesh.scrape_targets().items())
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        argv = self.mesh.mgmt_argv([
            BINARY, f"--config.file={self.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ])  # fmt: skip
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
        for _ in range(100):
            with contextlib.suppress(OSError, ValueError):
                await self.query("up")
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"Prometheus did not start; see {self.workdir / 'prometheus.log'}")

    async def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.parse.quote(promql)}"
        argv = self.mesh.mgmt_argv(["curl", "-sf", "--max-time", "3", url])
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise OSError(f"Prometheus query failed ({proc.returncode})")
        body = json.loads(out)
        if body.get("status") != "success":
            raise ValueError(f"PromQL error: {body}")
        return list(body["data"]["result"])

    async def wait_for_scrape(self) -> None:
        """Until every target has been scraped after the traffic."""
        targets = len(self.mesh.scrape_targets())
        for _ in range(100):
            up = await self.query("up == 1")
            if len(up) >= targets:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # two scrape intervals: the last counters are in

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
