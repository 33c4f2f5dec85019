"""Build a topology's networks for real: Linux network namespaces joined by veth pairs and bridges.

The layout, for a plan from `topology.addressing` (prefix `amb<pid>x<n>` keeps parallel runs apart):

    <prefix>-<cluster>-<node>   one per node: its pods' IPs and the node IP on `eth0`; ztunnel, waypoints and
                                the apps of that node run here. `lo` is up.
    <prefix>-<network>          the network's edge: bridge `br0` joining its nodes (router IP on it), and,
                                when there are gateways, leg `transit0` with the edge's transit address.
                                The east-west gateway runs here. Traffic leaving for the transit link is
                                masqueraded (as a cloud NAT would), and nothing from the transit link is
                                forwarded into the network unless it answers a connection made from inside.
    <prefix>-transit            bridge joining the edges: only the transit addresses live on it.
    <prefix>-mgmt               bridge joining every namespace that runs a daemon, on 203.0.113.0/24, for the
                                daemons' stats and readiness ports only (Prometheus can scrape from here).
                                It forwards nothing, so it is no path between networks.

Every network may use the same pod range: pods of one network cannot reach another network's pods, only
its edge's transit address (where that network's gateway listens). Nodes of one network share an L2
segment, so same-network clusters reach each other's pods directly.

Cleanup removes the namespaces (and so every interface in them) on `close()`, on leaving the `with` block,
at interpreter exit, and on SIGTERM/SIGHUP; namespaces left by a killed run are swept on the next build.
Without root, or when `ip netns` fails, `NetnsUnavailable` says why, so callers can fall back or skip.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from topology.addressing import MGMT_CIDR, MGMT_SCRAPER_IP, AddressPlan, Location

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
_STALE = re.compile(r"^amb(\d+)x\d+-")
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here; the message says why (for a skip reason or a fallback)."""


class NetnsError(RuntimeError):
    """An `ip` command failed while building or tearing down the networks."""


# --- running commands and code inside a namespace ----------------------------------------------------


def _ip(*args: str, ns: str | None = None) -> str:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _exec(ns: str, *argv: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` in {ns} failed: {proc.stderr.strip()}")


def exec_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside `ns` (unchanged when `ns` is None: loopback mode)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


_libc: ctypes.CDLL | None = None


def _setns(ns: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _in_thread(ns: str, fn: Callable[[], T], done: Callable[[T | None, BaseException | None], None]) -> None:
    """Run `fn` in a fresh thread that entered `ns`. A network namespace switch is per thread, and the
    thread ends right after, so no other code ever runs in the wrong namespace. Sockets keep the namespace
    they were made in, so they can be handed back to the event loop."""

    def work() -> None:
        try:
            _setns(ns)
            result = fn()
        except BaseException as e:  # handed to the caller, who re-raises it
            done(None, e)
        else:
            done(result, None)

    threading.Thread(target=work, name=f"netns-{ns}", daemon=True).start()


def run_in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """Call `fn` inside network namespace `ns` (directly when `ns` is None) and return its result."""
    if ns is None:
        return fn()
    box: list[tuple[T | None, BaseException | None]] = []
    finished = threading.Event()

    def done(result: T | None, error: BaseException | None) -> None:
        box.append((result, error))
        finished.set()

    _in_thread(ns, fn, done)
    finished.wait()
    result, error = box[0]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def arun_in_netns(ns: str | None, fn: Callable[[], T]) -> Awaitable[T]:
    """`run_in_netns` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    if ns is None:
        try:
            future.set_result(fn())
        except Exception as e:
            future.set_exception(e)
        return future

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def done(result: T | None, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone if the caller gave up
            loop.call_soon_threadsafe(settle, result, error)

    _in_thread(ns, fn, done)
    return future


async def open_connection(
    ns: str | None, host: str, port: int, *, timeout: float = 5.0, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams to host:port, dialled from inside `ns`; a timeout raises TimeoutError."""

    def dial() -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)  # fmt: skip

    sock = await arun_in_netns(ns, dial)
    sock.settimeout(None)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def start_server(
    ns: str | None,
    client_connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
) -> asyncio.Server:
    """An asyncio server listening on host:port inside `ns`."""

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    sock = await arun_in_netns(ns, listen)
    return await asyncio.start_server(client_connected, sock=sock, limit=1 << 20)


# --- availability --------------------------------------------------------------------------------------


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces cannot be built here."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        raise NetnsUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root, or use loopback mode)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    if shutil.which("iptables") is None:
        raise NetnsUnavailable("the `iptables` command is not installed (needed for the gateways' NAT)")
    probe = f"amb{os.getpid()}x{next(_counter)}-probe"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        raise NetnsUnavailable(f"cannot create a network namespace: {e}") from None
    try:
        _ip("link", "set", "lo", "up", ns=probe)
        _ip("link", "add", "probe0", "type", "veth", "peer", "name", "probe1", ns=probe)
        _ip("link", "add", "br0", "type", "bridge", ns=probe)
    except NetnsError as e:
        raise NetnsUnavailable(f"cannot create veth pairs or bridges in a namespace: {e}") from None
    finally:
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", probe)


def netns_unavailable_reason() -> str | None:
    """None when namespaces work, else why not (for `pytest.skip`)."""
    try:
        check_available()
    except NetnsUnavailable as e:
        return str(e)
    return None


# --- cleanup on every exit path --------------------------------------------------------------------------

_live: set[NetnsSandbox] = set()
_live_lock = threading.Lock()
_handlers_installed = False


def _cleanup_all() -> None:
    with _live_lock:
        sandboxes = list(_live)
    for sandbox in sandboxes:
        sandbox.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Raising unwinds `with` blocks and `finally` clauses (which stop processes first); atexit then removes
    # whatever is left. A second signal while unwinding is ignored rather than cutting the cleanup short.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):  # never override someone else's handler
            signal.signal(sig, _on_signal)


def _kill_processes_in(ns: str) -> None:
    """Processes still inside a namespace we made are ours (started in it by this code): stop them."""
    try:
        pids = _ip("netns", "pids", ns).split()
    except NetnsError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def sweep_stale() -> list[str]:
    """Remove namespaces left by runs of this code whose process is gone (killed with SIGKILL)."""
    try:
        names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    except NetnsError:
        return []
    removed = []
    for name in names:
        m = _STALE.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_processes_in(name)
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", name)
            removed.append(name)
    return removed


# --- the sandbox ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class NetnsSandbox:
    """The namespaces of one running topology. Use as a context manager, or call `close()`."""

    prefix: str
    node_ns: dict[tuple[str, str], str] = field(default_factory=dict)  # (cluster, node) -> namespace
    edge_ns: dict[str, str] = field(default_factory=dict)  # network -> namespace
    transit_ns: str | None = None
    mgmt_ns: str | None = None
    created: list[str] = field(default_factory=list)
    _closed: bool = False

    mode = "netns"

    def ns_for(self, location: Location) -> str:
        if location.is_edge:
            return self.edge_ns[location.network]
        return self.node_ns[(location.cluster, location.node)]

    def namespaces(self) -> list[str]:
        return list(self.created)

    def close(self) -> None:
        """Stop what still runs inside, then delete every namespace (and with it every veth). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for ns in reversed(self.created):
            _kill_processes_in(ns)
            try:
                _ip("netns", "del", ns)
            except NetnsError as e:
                if (NETNS_DIR / ns).exists():
                    errors.append(str(e))
        with _live_lock:
            _live.discard(self)
        if errors:
            raise NetnsError("; ".join(errors))

    def __enter__(self) -> NetnsSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class LoopbackSandbox:
    """Loopback mode: everything in the current namespace on 127.x addresses; nothing to build or remove."""

    reason: str = ""
    mode = "loopback"
    mgmt_ns: str | None = None

    def ns_for(self, location: Location) -> None:
        return None

    def namespaces(self) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> LoopbackSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def build_netns(plan: AddressPlan, prefix: str | None = None) -> NetnsSandbox:
    """Create the namespaces, links and addresses of a netns-mode plan. Removes what it made on failure."""
    if plan.mode != "netns":
        raise ValueError("build_netns needs a plan made with mode='netns'")
    check_available()
    sweep_stale()
    _install_handlers()
    sandbox = NetnsSandbox(prefix or f"amb{os.getpid()}x{next(_counter)}")
    with _live_lock:
        _live.add(sandbox)
    try:
        _Builder(plan, sandbox).build()
    except BaseException:
        with contextlib.suppress(NetnsError):
            sandbox.close()
        raise
    return sandbox


class _Builder:
    def __init__(self, plan: AddressPlan, sandbox: NetnsSandbox) -> None:
        self.plan = plan
        self.sb = sandbox
        self.mgmt_ports = itertools.count(1)
        self.mgmt_by_location: dict[Location, list[str]] = {}
        for d in plan.daemons:
            self.mgmt_by_location.setdefault(d.location, []).append(str(d.mgmt_ip))

    def add_ns(self, suffix: str) -> str:
        name = f"{self.sb.prefix}-{suffix}"
        _ip("netns", "add", name)
        self.sb.created.append(name)
        _ip("link", "set", "lo", "up", ns=name)
        return name

    def bridge(self, ns: str) -> None:
        _ip("link", "add", "br0", "type", "bridge", ns=ns)
        _ip("link", "set", "br0", "up", ns=ns)

    def veth(self, ns: str, name: str, bridge_ns: str, port: str) -> None:
        """A link `name` in `ns`, its peer `port` enslaved to `br0` of `bridge_ns`. Both ends are created
        inside namespaces, so no interface ever appears in the host's namespace."""
        _ip("link", "add", name, "type", "veth", "peer", "name", port, "netns", bridge_ns, ns=ns)
        _ip("link", "set", port, "master", "br0", "up", ns=bridge_ns)
        _ip("link", "set", name, "up", ns=ns)

    def mgmt_leg(self, ns: str, location: Location) -> None:
        addresses = self.mgmt_by_location.get(location, [])
        if not addresses or self.sb.mgmt_ns is None:
            return
        self.veth(ns, "mgmt0", self.sb.mgmt_ns, f"m{next(self.mgmt_ports)}")
        for ip in addresses:
            _ip("addr", "add", f"{ip}/{MGMT_CIDR.prefixlen}", "dev", "mgmt0", ns=ns)

    def build(self) -> None:
        plan, sb = self.plan, self.sb
        if plan.daemons:
            sb.mgmt_ns = self.add_ns("mgmt")
            self.bridge(sb.mgmt_ns)
            # The scraper's own address (Prometheus, readiness checks run in this namespace).
            _ip("addr", "add", f"{MGMT_SCRAPER_IP}/{MGMT_CIDR.prefixlen}", "dev", "br0", ns=sb.mgmt_ns)
        if plan.has_transit:
            sb.transit_ns = self.add_ns("transit")
            self.bridge(sb.transit_ns)
        for k, net in enumerate(plan.topology.networks, start=1):
            ns = sb.edge_ns[net.name] = self.add_ns(net.name)
            self.bridge(ns)
            _ip("addr", "add", f"{plan.routers[net.name]}/{plan.pod_prefixes[net.name]}", "dev", "br0", ns=ns)
            if sb.transit_ns is not None:
                self.veth(ns, "transit0", sb.transit_ns, f"t{k}")
                _ip("addr", "add", f"{plan.transit[net.name]}/{plan.transit_prefix}", "dev", "transit0", ns=ns)
                self.edge_firewall(ns)
            self.mgmt_leg(ns, Location(net.name))
        for i, node in enumerate(plan.nodes, start=1):
            ns = sb.node_ns[(node.cluster, node.node)] = self.add_ns(f"{node.cluster}-{node.node}")
            self.veth(ns, "eth0", sb.edge_ns[node.network], f"p{i}")
            prefix = plan.pod_prefixes[node.network]
            _ip("addr", "add", f"{node.ip}/{prefix}", "dev", "eth0", ns=ns)  # first: the primary source address
            for pod in plan.pods:
                if (pod.cluster, pod.node) == (node.cluster, node.node):
                    _ip("addr", "add", f"{pod.ip}/{prefix}", "dev", "eth0", ns=ns)
            if sb.transit_ns is not None:
                # Only the transit range (the gateways) is routed out of the network, via its edge.
                _ip("route", "add", str(plan.topology.transit_cidr), "via", str(plan.routers[node.network]), ns=ns)
            self.mgmt_leg(ns, node.location)

    def edge_firewall(self, ns: str) -> None:
        _exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Leaving: take the edge's transit address, so answers come back here whatever the pod ranges are.
        _exec(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "transit0", "-j", "MASQUERADE")
        # Entering: only answers to connections made from inside; nobody outside can address our pods.
        _exec(ns, "iptables", "-A", "FORWARD", "-i", "transit0", "-m", "conntrack", "--ctstate",
              "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        _exec(ns, "iptables", "-A", "FORWARD", "-i", "transit0", "-j", "DROP")
