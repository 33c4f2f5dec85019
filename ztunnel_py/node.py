"""What the ztunnel of one node knows: its settings, the mesh state, its local workloads, its metrics."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

from hbone import baggage as baggage_codec
from hbone.authority import format_authority
from mesh.daemon import DaemonContext
from mesh.metrics import TcpMetrics
from mesh.model import Workload
from mesh.routing import Hop, Router
from mesh.state import MeshState
from ztunnel_py.settings import own_ports


class Node:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.node_name: str | None = s.node_name
        self.connect_timeout: float = s.connect_timeout
        self.tcp = TcpMetrics(ctx.registry)
        rb = s.enable_response_baggage
        # ztunnel's own flag wins when set; otherwise the mesh-wide switch decides (SPEC §4.3).
        self.response_baggage: bool = rb if rb is not None else ctx.baggage_enabled
        # The ports of our own listeners: refused as a loopback destination outbound, and as a target inbound.
        self.own_ports: frozenset[int] = own_ports(s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._router: Router | None = None
        self._router_generation = -1
        self._local: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Workload] = {}
        self._baggage: dict[Workload, str] = {}
        self.refresh(ctx.watcher.state)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def state(self) -> MeshState:
        return self.ctx.watcher.state

    def refresh(self, state: MeshState) -> None:
        """Recompute which workloads are local after a config change."""
        local: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Workload] = {}
        for w in self.local_workloads(state):
            for ip in w.workload_ips:
                local[ip] = w
        self._local = local
        self._baggage = {}

    def local_workloads(self, state: MeshState | None = None) -> Iterable[Workload]:
        state = state or self.state
        info = self.ctx.settings.proxy_workload_info
        if info is not None:  # dedicated mode
            return state.workloads_for_proxy(info.namespace, info.name, info.service_account)
        if self.node_name:
            return (w for w in state.workloads_on_node(self.node_name) if w.network == self.ctx.network)
        return ()

    def local_ips(self) -> list[str]:
        return [str(ip) for ip in self._local]

    def local_workload(self, ip: str) -> Workload | None:
        try:
            return self._local.get(ipaddress.ip_address(ip))
        except ValueError:
            return None

    def source_workload(self, client_ip: str) -> Workload | None:
        """Shared mode: the local workload with the client's IP. Dedicated mode: the proxy's workload."""
        if self.ctx.settings.proxy_workload_info is not None:
            return next(iter(self.local_workloads()), None)
        addr = ipaddress.ip_address(client_ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return self._local.get(addr)

    def router(self) -> Router:
        if self._router is None or self._router_generation != self.ctx.watcher.generation:
            self._router = Router(self.state, self.ctx.network)
            self._router_generation = self.ctx.watcher.generation
        return self._router

    def baggage_of(self, workload: Workload) -> str:
        cached = self._baggage.get(workload)
        if cached is None:
            cached = self._baggage[workload] = baggage_codec.encode(workload.baggage())
        return cached

    def is_self_call(self, host: str, port: int) -> bool:
        """An application's destination that loops back into one of our own ports."""
        if port not in self.own_ports:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host == "localhost"
        # ::ffff:127.0.0.1 reaches 127.0.0.1, but Python < 3.13 does not call it loopback.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback

    # -- bookkeeping --------------------------------------------------------------------------------
    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self._tasks

    def access_log_outbound(
        self,
        source: Workload,
        hop: Hop,
        request: object,
        sent: int,
        received: int,
        duration: float,
        flags: str,
        error: str | None,
    ) -> None:
        log = self.ctx.access_log
        if not log.enabled:
            return
        client = getattr(request, "client", ("", 0))
        log.write(
            {
                "direction": "outbound",
                "src.addr": format_authority(client[0], client[1]),
                "src.workload": source.name,
                "src.namespace": source.namespace,
                "src.identity": str(source.identity),
                "dst.addr": format_authority(*hop.address),
                "dst.hbone_addr": hop.authority or None,
                "dst.service": hop.service_hostname,
                "dst.workload": hop.workload.name if hop.workload is not None else None,
                "dst.identity": ",".join(sorted(str(i) for i in hop.expected)) or None,
                "route": hop.kind.value,
                "bytes_sent": sent,
                "bytes_recv": received,
                "duration": f"{duration * 1000:.1f}ms",
                "flags": flags,
                "error": error,
            }
        )
