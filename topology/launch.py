"""Run a whole topology on this machine: every daemon and sample app as its own process.

    async with Mesh("topology/examples/two-networks.yaml", workdir, baggage=True) as mesh:
        result = await mesh.curl("sleep", "http://echo.default.svc.cluster.local/")
        metrics = await mesh.scrape("cluster1/ztunnel")
        print(mesh.addresses())

Per cluster: one ztunnel per node (shared mode, NODE_NAME), its waypoints, and the east-west gateway of its
network; plus one sample app process (`topology.app`) per pod. In `netns` mode (root) they run inside the
namespaces of `topology.netns` with the real addresses; in `loopback` mode on 127.x addresses. `auto` picks
netns when it can and says why not otherwise (`Mesh.mode_reason`).

The work dir holds `pki/` (the mesh PKI, one cacerts folder per cluster), `config/<cluster>.yaml` (the
generated mesh state), `logs/<process>.log` (stdout+stderr of each process) and `addresses.txt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import h11

from certs import make_mesh_pki
from topology import netns
from topology.addressing import (
    ADMIN_PORT,
    HBONE_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
    SOCKS5_PORT,
    STATS_PORT,
    AddressPlan,
    DaemonPlan,
    PodPlan,
    default_loopback_base,
    describe,
    format_table,
    plan_addresses,
)
from topology.generate import write_configs
from topology.loader import load_topology
from topology.spec import AppSpec, Topology

REPO_ROOT = Path(__file__).resolve().parent.parent
RunMode = Literal["netns", "loopback", "auto"]
ProcessKind = Literal["app", "ztunnel", "waypoint", "gateway"]
DAEMON_MODULES: dict[str, str] = {"ztunnel": "ztunnel_py", "waypoint": "waypoint_py", "gateway": "ewgateway_py"}
# Variables a child may inherit; everything else it gets is set here, so a stray NETWORK=... in the
# caller's shell cannot change what the mesh does.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "SSL_CERT_FILE")
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The mesh could not start; the message names the process and quotes the end of its log."""


@dataclass
class ManagedProcess:
    name: str  # `cluster1/ztunnel/node1`, `cluster2/echo-v2-1`, ...
    kind: ProcessKind
    argv: list[str]
    env: dict[str, str]
    ns: str | None
    log_path: Path
    ready: tuple[str, int, str]  # (host, port, "http" readiness path or "" for "port accepts")
    ready_ns: str | None
    proc: asyncio.subprocess.Process | None = None
    stopping: bool = False
    previous_exits: list[int] = field(default_factory=list)  # exit codes of earlier runs (restarts)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True, slots=True)
class CurlResult:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> CurlResult:
        if self.returncode != 0:
            raise AssertionError(f"curl exited {self.returncode}: {self.stderr.strip()} ({' '.join(self.argv)})")
        return self


@dataclass(frozen=True, slots=True)
class HttpResult:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Mesh:
    """A running topology. `async with Mesh(...)` starts it and stops everything (namespaces too) after."""

    def __init__(
        self,
        topology: Topology | str | Path,
        workdir: str | Path,
        *,
        baggage: bool = False,
        mode: RunMode = "auto",
        daemons: bool | Collection[str] = True,
        log_level: str = "info",
        ready_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.workdir = Path(workdir)
        self.baggage = baggage
        self.requested_mode = mode
        # True: all; False: apps only; or the kinds to run, e.g. ("ztunnel", "gateway").
        self.daemon_kinds = set(DAEMON_MODULES) if daemons is True else set(daemons or ())
        unknown = self.daemon_kinds - set(DAEMON_MODULES)
        if unknown:
            raise ValueError(f"unknown daemon kinds {sorted(unknown)}; expected some of {sorted(DAEMON_MODULES)}")
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.extra_env = dict(env or {})
        self.python = python
        self.mode: Literal["netns", "loopback"] = "loopback"
        self.mode_reason = ""
        self.plan: AddressPlan | None = None
        self.sandbox: netns.NetnsSandbox | netns.LoopbackSandbox = netns.LoopbackSandbox()
        self.configs: dict[str, Path] = {}
        self.pki: dict[str, Path] = {}
        self.processes: dict[str, ManagedProcess] = {}
        self._logs: list[IO[bytes]] = []

    # --- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Plan, build the networks, write PKI and configs, start every process and wait until all are ready."""
        try:
            self._prepare()
            await self._start_all()
        except BaseException:
            await self.stop()
            raise

    def _prepare(self) -> None:
        self.mode, self.mode_reason = self._choose_mode()
        self.plan = (
            plan_addresses(self.topology, "netns") if self.mode == "netns" else _free_loopback_plan(self.topology)
        )
        for sub in ("logs", "config"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.pki = make_mesh_pki(self.workdir / "pki", [c.id for c in self.topology.clusters])
        self.configs = write_configs(self.topology, self.plan, self.workdir / "config")
        (self.workdir / "addresses.txt").write_text(self.addresses() + "\n")
        if self.mode == "netns":
            self.sandbox = netns.build_netns(self.plan)
        else:
            self.sandbox = netns.LoopbackSandbox(self.mode_reason)
        self.processes = {p.name: p for p in self._plan_processes()}

    def _choose_mode(self) -> tuple[Literal["netns", "loopback"], str]:
        if self.requested_mode == "loopback":
            return "loopback", "loopback mode was asked for"
        reason = netns.netns_unavailable_reason()
        if reason is None:
            return "netns", ""
        if self.requested_mode == "netns":
            raise netns.NetnsUnavailable(reason)
        return "loopback", reason

    async def _start_all(self) -> None:
        if self.daemon_kinds:
            missing = sorted({DAEMON_MODULES[p.kind] for p in self.processes.values() if p.kind != "app"
                              and importlib.util.find_spec(f"{DAEMON_MODULES[p.kind]}.__main__") is None})  # fmt: skip
            if missing:
                raise LaunchError(f"cannot start the mesh: {', '.join(missing)} has no __main__ module yet")
        for p in self.processes.values():
            await self._spawn(p)
        await asyncio.gather(*(self._wait_ready(p) for p in self.processes.values()))

    async def stop(self) -> None:
        """SIGTERM every process, SIGKILL what is left after `stop_timeout`, then remove the namespaces."""
        running = [p for p in self.processes.values() if p.running]
        for p in running:
            p.stopping = True
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        if running:
            await asyncio.wait([asyncio.ensure_future(self._reap(p)) for p in running], timeout=self.stop_timeout)
        for p in running:
            if p.running:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.kill()  # type: ignore[union-attr]
                await self._reap(p)
        for log in self._logs:
            log.close()
        self._logs.clear()
        self.sandbox.close()

    @staticmethod
    async def _reap(p: ManagedProcess) -> int:
        assert p.proc is not None
        return await p.proc.wait()

    # --- per-process control (for fault tests) -----------------------------------------------------------

    async def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Signal one process and wait for it (SIGKILL after `timeout`); returns its exit code."""
        p = self.process(name)
        if p.proc is None:
            raise LaunchError(f"{name} was never started")
        if p.running:
            p.stopping = True
            p.proc.send_signal(sig)
            try:
                await asyncio.wait_for(p.proc.wait(), timeout or self.stop_timeout)
            except TimeoutError:
                p.proc.kill()
        return await self._reap(p)

    async def start_process(self, name: str) -> None:
        """(Re)start one process and wait until it is ready."""
        p = self.process(name)
        if p.running:
            raise LaunchError(f"{name} is already running")
        await self._spawn(p)
        await self._wait_ready(p)

    async def restart(self, name: str) -> None:
        await self.stop_process(name)
        await self.start_process(name)

    def process(self, name: str) -> ManagedProcess:
        """By full name, or by a prefix naming one process (`cluster1/ztunnel`, `cluster2/echo-v2`)."""
        if name in self.processes:
            return self.processes[name]
        found = [p for n, p in self.processes.items() if n.startswith(name.rstrip("/") + "/")
                 or n.startswith(name.rstrip("-") + "-")]  # fmt: skip
        if len(found) != 1:
            what = "no process" if not found else "several processes"
            raise KeyError(f"{what} called {name!r}; processes: {', '.join(self.processes)}")
        return found[0]

    def unexpected_exits(self) -> dict[str, int]:
        """Processes that died without being asked to, with their exit code."""
        return {p.name: p.proc.returncode for p in self.processes.values()
                if p.proc is not None and p.proc.returncode is not None and not p.stopping}  # fmt: skip

    # --- what tests and the demo use ------------------------------------------------------------------------

    def addresses(self) -> str:
        """The address and port table of the running topology."""
        assert self.plan is not None
        return format_table([("WHAT", "WHERE", "ADDRESS", "PORTS"), *describe(self.plan)])

    def pod(self, app: str) -> PodPlan:
        """A pod by `<pod>`, `<deployment>` (its first replica) or `<cluster>/<deployment or pod>`."""
        assert self.plan is not None
        cluster, _, name = app.rpartition("/")
        candidates = [p for p in self.plan.pods if p.kind == "app" and (not cluster or p.cluster == cluster)]
        exact = [p for p in candidates if p.name == name]
        if exact:
            return exact[0]
        by_workload = [p for p in candidates if p.workload == name]
        if not by_workload:
            raise KeyError(f"no app {app!r}; apps: {', '.join(sorted({p.workload for p in candidates}))}")
        if len({p.cluster for p in by_workload}) > 1:
            raise KeyError(f"app {name!r} runs in several clusters; write <cluster>/{name}")
        return by_workload[0]

    def app_spec(self, pod: PodPlan) -> AppSpec:
        return next(a for a in self.topology.apps
                    if (a.cluster, a.namespace, a.name) == (pod.cluster, pod.namespace, pod.workload))  # fmt: skip

    def daemon(self, name: str) -> DaemonPlan:
        assert self.plan is not None
        return self.plan.daemon(name)

    def ns_of_pod(self, pod: PodPlan) -> str | None:
        return self.sandbox.ns_for(pod.location)

    def curl_argv(self, from_app: str, url: str, *args: str, timeout: float = 30.0) -> list[str]:
        """The command line `curl` would run: through the client pod's ztunnel, from the pod's IP."""
        assert self.plan is not None
        pod = self.pod(from_app)
        node = self.plan.node(pod.cluster, pod.node)
        argv = ["curl", "-sS", "--max-time", f"{timeout:g}", "--interface", str(pod.ip),
                "--socks5-hostname", f"{node.ip}:{SOCKS5_PORT}", *args, url]  # fmt: skip
        return netns.exec_argv(self.ns_of_pod(pod), argv)

    async def curl(self, from_app: str, url: str, *args: str, timeout: float = 30.0) -> CurlResult:
        """Run real `curl --socks5-hostname` from `from_app`'s pod through its node's ztunnel."""
        argv = self.curl_argv(from_app, url, *args, timeout=timeout)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await proc.communicate()
        return CurlResult(argv, proc.returncode or 0, out, err.decode(errors="replace"))

    async def http_get(self, daemon: str, path: str, *, port: Literal["stats", "readiness"] = "stats") -> HttpResult:
        """GET a daemon's stats or readiness endpoint (from the management network in netns mode)."""
        d = self.daemon(daemon)
        host, number = d.stats if port == "stats" else d.readiness
        return await _http_get(self.sandbox.mgmt_ns, host, number, path)

    async def scrape(self, daemon: str) -> str:
        """The daemon's Prometheus text (`GET /metrics`)."""
        result = await self.http_get(daemon, "/metrics")
        if result.status != 200:
            raise LaunchError(f"{daemon}: GET /metrics answered {result.status}: {result.text[:200]}")
        return result.text

    def scrape_targets(self) -> dict[str, str]:
        """{daemon: "ip:port"} of every stats endpoint, e.g. for a Prometheus config."""
        assert self.plan is not None
        return {d.name: f"{d.mgmt_ip}:{STATS_PORT}" for d in self.plan.daemons}

    def mgmt_argv(self, argv: Sequence[str]) -> list[str]:
        """Run `argv` where every stats endpoint is reachable (the management namespace in netns mode)."""
        return netns.exec_argv(self.sandbox.mgmt_ns, argv)

    def log(self, name: str) -> str:
        return self.process(name).log_path.read_text(errors="replace")

    # --- processes -----------------------------------------------------------------------------------------

    def _plan_processes(self) -> list[ManagedProcess]:
        assert self.plan is not None
        out = []
        for pod in self.plan.pods:
            if pod.kind != "app":
                continue
            app = self.app_spec(pod)
            argv = [self.python, "-m", "topology.app", "--name", pod.name, "--listen", f"{pod.ip}:{app.http_port}",
                    "--version", app.version, "--cluster", pod.cluster]  # fmt: skip
            if app.tcp_port is not None:
                argv += ["--tcp-echo", f"{pod.ip}:{app.tcp_port}"]
            ns = self.ns_of_pod(pod)
            name = (
                f"{pod.cluster}/{pod.name}"
                if pod.namespace == "default"
                else f"{pod.cluster}/{pod.namespace}/{pod.name}"
            )
            out.append(self._process(name, "app", argv, {"CLUSTER_ID": pod.cluster}, ns,
                                     (str(pod.ip), app.http_port, ""), ns))  # fmt: skip
        for d in self.plan.daemons:
            if d.kind in self.daemon_kinds:
                argv = [self.python, "-m", DAEMON_MODULES[d.kind]]
                ready = (str(d.mgmt_ip), READINESS_PORT, "/healthz/ready")
                out.append(self._process(d.name, d.kind, argv, self._daemon_env(d), self.sandbox.ns_for(d.location),
                                         ready, self.sandbox.mgmt_ns))  # fmt: skip
        return out

    def _process(
        self,
        name: str,
        kind: ProcessKind,
        argv: list[str],
        env: dict[str, str],
        ns: str | None,
        ready: tuple[str, int, str],
        ready_ns: str | None,
    ) -> ManagedProcess:
        log_path = self.workdir / "logs" / (name.replace("/", "_") + ".log")
        return ManagedProcess(name, kind, argv, self._base_env() | env | self.extra_env, ns, log_path, ready, ready_ns)

    def _base_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        # `topology` is not an installed package; the daemons and certs are (editable), either way works.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _daemon_env(self, d: DaemonPlan) -> dict[str, str]:
        env = {
            "CLUSTER_ID": d.cluster,
            "NETWORK": d.network,
            "TRUST_DOMAIN": self.topology.trust_domain,
            "LOCAL_XDS_PATH": str(self.configs[d.cluster]),
            "CA_CERTS_DIR": str(self.pki[d.cluster]),
            "AMBIENT_ENABLE_BAGGAGE": "true" if self.baggage else "false",
            "STATS_ADDR": f"{d.mgmt_ip}:{STATS_PORT}",
            "READINESS_ADDR": f"{d.mgmt_ip}:{READINESS_PORT}",
            "ADMIN_ADDR": f"{d.admin[0]}:{d.admin[1]}",
            "LOG_LEVEL": self.log_level,
            "DRAIN_DEADLINE": "2s",
        }
        if d.kind == "ztunnel":
            # Shared mode: no PROXY_WORKLOAD_INFO (that would make it a dedicated proxy for one workload).
            env.update({
                "NODE_NAME": d.location.node,
                "SOCKS5_ADDR": f"{d.ip}:{SOCKS5_PORT}",
                "OUTBOUND_ADDR": f"{d.ip}:{OUTBOUND_PORT}",
            })  # fmt: skip
        else:
            env.update({"PROXY_WORKLOAD_INFO": d.workload_info, "INBOUND_ADDR": f"{d.ip}:{HBONE_PORT}"})
        return env

    async def _spawn(self, p: ManagedProcess) -> None:
        log = open(p.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime, closed in stop()
        self._logs.append(log)
        log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(p.argv)}\n".encode())
        log.flush()
        p.stopping = False
        if p.proc is not None and p.proc.returncode is not None:
            p.previous_exits.append(p.proc.returncode)
        p.proc = await asyncio.create_subprocess_exec(
            *netns.exec_argv(p.ns, p.argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=p.env,
            cwd=str(REPO_ROOT),
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the children in order
            preexec_fn=_die_with_parent,
        )

    async def _wait_ready(self, p: ManagedProcess) -> None:
        host, port, path = p.ready
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        while True:
            if not p.running:
                code = p.proc.returncode if p.proc else None
                raise LaunchError(f"{p.name} exited with status {code} while starting; its log "
                                  f"({p.log_path}) ends with:\n{p.log_tail()}")  # fmt: skip
            try:
                if path:
                    result = await _http_get(p.ready_ns, host, port, path, timeout=1.0)
                    if result.status == 200:
                        return
                    last = f"GET {path} answered {result.status}: {result.text.strip()[:200]}"
                else:
                    _, writer = await netns.open_connection(p.ready_ns, host, port, timeout=1.0)
                    writer.close()
                    return
            except (OSError, TimeoutError, h11.ProtocolError) as e:
                last = f"{host}:{port}: {e or type(e).__name__}"
            if time.monotonic() > deadline:
                raise LaunchError(f"{p.name} not ready after {self.ready_timeout:g}s ({last}); its log "
                                  f"({p.log_path}) ends with:\n{p.log_tail()}")  # fmt: skip
            await asyncio.sleep(0.05)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies without stopping us (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _http_get(ns: str | None, host: str, port: int, path: str, *, timeout: float = 5.0) -> HttpResult:
    """A one-shot HTTP/1.1 GET (h11), dialled from inside `ns`."""
    reader, writer = await netns.open_connection(ns, host, port, timeout=timeout)
    conn = h11.Connection(h11.CLIENT)
    try:
        writer.write(conn.send(h11.Request(method="GET", target=path,
                                           headers=[("host", f"{host}:{port}"), ("connection", "close")])))  # fmt: skip
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, body = 0, bytearray()
        async with asyncio.timeout(timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return HttpResult(status, bytes(body))
    finally:
        writer.close()


def _free_loopback_plan(topology: Topology) -> AddressPlan:
    """A loopback plan whose addresses nobody on this machine uses yet (another run, another program)."""
    first = default_loopback_base()
    bases = [first, *(b for b in range(16, 236, 10) if b != first)]
    last_busy = ""
    for base in bases:
        plan = plan_addresses(topology, "loopback", loopback_base=base)
        busy = _first_busy(plan)
        if busy is None:
            return plan
        last_busy = busy
    raise LaunchError(f"no free block of loopback addresses (last one busy: {last_busy})")


def _first_busy(plan: AddressPlan) -> str | None:
    wanted: list[tuple[str, int]] = []
    for d in plan.daemons:
        wanted += [(str(d.ip), HBONE_PORT), (str(d.mgmt_ip), STATS_PORT), (str(d.mgmt_ip), READINESS_PORT),
                   (d.admin[0], d.admin[1] if d.admin[1] else ADMIN_PORT)]  # fmt: skip
        if d.kind == "ztunnel":
            wanted += [(str(d.ip), SOCKS5_PORT), (str(d.ip), OUTBOUND_PORT)]
    for pod in plan.pods:
        wanted.append((str(pod.ip), HBONE_PORT))
    for host, port in dict.fromkeys(wanted):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return f"{host}:{port}"
    return None


async def _run_until_interrupted(mesh: Mesh) -> None:
    async with mesh:
        assert mesh.plan is not None
        print(f"mesh up in {mesh.mode} mode" + (f" ({mesh.mode_reason})" if mesh.mode_reason else ""))
        print(f"work dir: {mesh.workdir} (configs, pki, logs)\n")
        print(mesh.addresses() + "\n")
        client = next((p for p in mesh.plan.pods if p.kind == "app"), None)
        service = next(iter(mesh.topology.services), None)
        if client is not None and service is not None:
            port = next(iter(service.ports))
            url = f"http://{service.hostname}:{port}/"
            print("try:\n  " + " ".join(mesh.curl_argv(f"{client.cluster}/{client.name}", url)))
            stats = mesh.daemon(f"{client.cluster}/ztunnel")
            print("  " + " ".join(mesh.mgmt_argv(["curl", "-s", f"http://{stats.mgmt_ip}:{STATS_PORT}/metrics"])))
        print("\nCtrl-C stops everything.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m topology.launch", description="Run a topology until Ctrl-C.")
    parser.add_argument("topology", type=Path)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--mode", choices=("auto", "netns", "loopback"), default="auto")
    parser.add_argument("--baggage", action="store_true", help="AMBIENT_ENABLE_BAGGAGE=true for every daemon")
    parser.add_argument("--apps-only", action="store_true", help="start the sample apps but no daemon")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ambient-mesh-"))
    try:
        mesh = Mesh(args.topology, workdir, baggage=args.baggage, mode=args.mode, daemons=not args.apps_only,
                    log_level=args.log_level)  # fmt: skip
        asyncio.run(_run_until_interrupted(mesh))
    except (LaunchError, netns.NetnsUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
