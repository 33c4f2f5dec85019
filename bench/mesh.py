"""The real daemons (ztunnel_py, waypoint_py, ewgateway_py) on loopback, for the request and multi-hop scenarios.

A scenario describes its mesh as a small topology (the format of `topology/`, see `topology.loader`);
`topology.launch.Mesh` plans the 127.x addresses, mints the PKI and writes each cluster's mesh state exactly
as it does for the tests and the demo. The daemons are then started here, as processes of `ctx.procs`
(so the harness reads their CPU and memory and stops them whatever happens), with the environment the
launcher would give them. The sample apps of the topology are NOT started: the scenario puts its own
servers (`bench.workers.http_server`, `bench.workers.sink`) on the pod addresses.

Daemons write their access logs on stdout; here stdout and stderr both go to `<workdir>/<name>.log`.
"""

from __future__ import annotations

import contextlib
import http.client
import time
from pathlib import Path

from bench.framework import Context
from bench.procs import Process, ProcessFailed
from topology.addressing import SOCKS5_PORT
from topology.launch import Mesh


class BenchMesh:
    def __init__(self, ctx: Context, topology_yaml: str, *, env: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        path = ctx.workdir / "topology.yaml"
        path.write_text(topology_yaml)
        self.mesh = Mesh(path, ctx.workdir / "mesh", mode="loopback", env=env)
        self.mesh._prepare()  # plan, PKI, mesh state files; starts nothing (the launcher's own first step)
        self.daemons: dict[str, Process] = {}

    @property
    def workdir(self) -> Path:
        return self.mesh.workdir

    def start(self, *names: str, timeout: float = 30.0) -> list[Process]:
        """Start the named daemons (`cluster1/ztunnel/node1`, or a prefix naming one) and wait until ready."""
        started = []
        for name in names:
            planned = self.mesh.process(name)
            if planned.kind == "app":
                raise ValueError(f"{name} is a sample app; a scenario starts its own servers")
            proc = self.ctx.procs.start(planned.name.replace("/", "-"), planned.argv, env=planned.env,
                                        stdout_to_log=True)  # fmt: skip
            self.daemons[planned.name] = proc
            started.append((planned.ready, proc))
        for (host, port, path), proc in started:
            wait_ready(proc, host, port, path, timeout)
        return [proc for _, proc in started]

    def daemon(self, name: str) -> Process:
        return self.daemons[self.mesh.process(name).name]

    def pod_ip(self, app: str) -> str:
        return str(self.mesh.pod(app).ip)

    def socks5(self, cluster: str, node: str) -> str:
        """HOST:PORT of that node's ztunnel SOCKS5 listener."""
        assert self.mesh.plan is not None
        return f"{self.mesh.plan.node(cluster, node).ip}:{SOCKS5_PORT}"

    def vip(self, service: str) -> str:
        assert self.mesh.plan is not None
        spec = next(s for s in self.mesh.topology.services if s.name == service)
        return str(self.mesh.plan.vips[(spec.namespace, spec.name)])


def wait_ready(proc: Process, host: str, port: int, path: str, timeout: float) -> None:
    """GET `path` until 200 (the daemons' readiness endpoint); fails early, with the log, if `proc` dies."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if not proc.alive():
            raise proc.failure("exited while starting")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(host, port, timeout=1.0)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                if response.status == 200:
                    return
                last = f"GET {path} answered {response.status}"
            finally:
                conn.close()
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{proc.name} not ready after {timeout:g}s ({last})\n{proc.log_tail()}")
        time.sleep(0.05)
