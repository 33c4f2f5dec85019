"""Run the real daemons as separate processes for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    """One daemon process (`python -m <module>`) with its environment and log file."""

    module: str
    env: dict[str, str]
    log_path: Path
    readiness: str  # host:port of READINESS_ADDR
    proc: subprocess.Popen[bytes] | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns1"]

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    async def wait_ready(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.logs()}")
            if await asyncio.to_thread(self._ready_once):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.module} not ready after {timeout}s:\n{self.logs()}")

    def _ready_once(self) -> bool:
        if self.prefix:  # inside a network namespace: ask from there
            done = subprocess.run(
                [*self.prefix, "curl", "-sf", "--max-time", "1", f"http://{self.readiness}/healthz/ready"],
                capture_output=True,
            )
            return done.returncode == 0
        try:
            with urllib.request.urlopen(f"http://{self.readiness}/healthz/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()
        return self.proc.returncode


def ztunnel_env(ip: str, config: Path, ca_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a shared-mode `ztunnel_py` for node1 of cluster1, listening on `ip`: SOCKS5 on 15080,
    capture off, stats, readiness and admin on Istio's ports. `overrides` (e.g. NETWORK="network1") add settings
    or replace these."""
    return {
        "NODE_NAME": "node1",
        "CLUSTER_ID": "cluster1",
        "LOCAL_XDS_PATH": str(config),
        "CA_CERTS_DIR": str(ca_dir),
        "SOCKS5_ADDR": f"{ip}:15080",
        "OUTBOUND_ADDR": "off",
        "STATS_ADDR": f"{ip}:15020",
        "READINESS_ADDR": f"{ip}:15021",
        "ADMIN_ADDR": f"{ip}:15000",
        **overrides,
    }


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


async def scrape(stats: str) -> str:
    """The text of a daemon's /metrics (STATS_ADDR host:port)."""
    return await asyncio.to_thread(http_get, f"http://{stats}/metrics")


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Parse the samples of one metric out of Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), sample.value))
    return out


async def run_curl(*args: str, timeout: float = 60.0, prefix: tuple[str, ...] = ()) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        "curl",
        "-sS",
        "--max-time",
        str(int(timeout)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def start_app(name: str, host: str, port: int, log_path: Path, prefix: tuple[str, ...] = ()) -> Daemon:
    """The sample app (`python -m topology.app`), as a process; ready once it answers GET /."""
    app = Daemon("topology.app", {}, log_path, f"{host}:{port}", prefix=list(prefix))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    app._log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's life
    app.proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "topology.app", "--name", name, "--listen", f"{host}:{port}"],
        env=env,
        cwd=REPO,
        stdout=app._log,
        stderr=subprocess.STDOUT,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        code, _, _ = await run_curl(f"http://{host}:{port}/", timeout=2, prefix=prefix)
        if code == 0:
            return app
        if app.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"sample app {name} did not start:\n{app.logs()}")
