"""Running the real waypoint (`python -m waypoint_py`) as a subprocess, and reading its metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE = 30.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class WaypointProcess:
    def __init__(self, host: str, env: dict[str, str], log_path: Path) -> None:
        self.host = host
        self.inbound = (host, free_port(host))
        self.stats = (host, free_port(host))
        self.readiness = (host, free_port(host))
        self.admin = (host, free_port(host))
        self.log_path = log_path
        self.env = {
            **os.environ,
            "INBOUND_ADDR": f"{host}:{self.inbound[1]}",
            "STATS_ADDR": f"{host}:{self.stats[1]}",
            "READINESS_ADDR": f"{host}:{self.readiness[1]}",
            "ADMIN_ADDR": f"{host}:{self.admin[1]}",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WaypointProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "waypoint_py"], cwd=REPO, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + START_DEADLINE
        url = f"http://{self.readiness[0]}:{self.readiness[1]}/healthz/ready"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"waypoint exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"waypoint not ready after {START_DEADLINE}s:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not found for pid {self.pid}")

    def scrape(self) -> list[Sample]:
        url = f"http://{self.stats[0]}:{self.stats[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return [Sample(s.name, dict(s.labels), s.value)
                for family in text_string_to_metric_families(text) for s in family.samples]  # fmt: skip

    def terminate(self) -> int:
        """SIGTERM (a graceful drain) and the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
