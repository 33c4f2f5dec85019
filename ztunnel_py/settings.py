"""ztunnel's settings: the common ones plus its listeners and Istio's ztunnel flags."""

from __future__ import annotations

from mesh.model import DEFAULT_HBONE_PORT
from mesh.settings import OFF, Setting, Settings, addr, addr_or_off, common_settings, duration

# The ports of the per-workload-IP listeners, used when INBOUND_ADDR / INBOUND_PLAINTEXT_ADDR are unset:
# HBONE on mesh.model.DEFAULT_HBONE_PORT (15008), plaintext capture on this one.
PLAINTEXT_PORT = 15006


def ztunnel_settings() -> list[Setting]:
    return [
        *common_settings(),
        Setting("NODE_NAME", help="Shared mode: serve the workloads whose `node` is this name."),
        Setting(
            "INBOUND_ADDR",
            type=addr,
            help="HBONE listener, e.g. 0.0.0.0:15008 (one ztunnel per network namespace). "
            "Unset: port 15008 on each local workload IP.",
        ),
        Setting(
            "INBOUND_PLAINTEXT_ADDR",
            type=addr_or_off,
            help="Plaintext inbound capture listener (SO_ORIGINAL_DST). Unset: port "
            "15006 on each local workload IP; `off` disables it.",
        ),
        Setting(
            "SOCKS5_ADDR",
            default="127.0.0.1:15080",
            type=addr_or_off,
            help="SOCKS5 outbound listener; `off` disables it.",
        ),
        Setting(
            "OUTBOUND_ADDR",
            default="0.0.0.0:15001",
            type=addr_or_off,
            help="Outbound capture listener (iptables REDIRECT, SO_ORIGINAL_DST); `off` disables it.",
        ),
        Setting(
            "ENABLE_RESPONSE_BAGGAGE",
            type=bool,
            help="Istio ztunnel's flag: answer CONNECTs with the destination's baggage and read request "
            "baggage. Unset: follows AMBIENT_ENABLE_BAGGAGE.",
        ),
        Setting(
            "CONNECT_TIMEOUT",
            default="10s",
            type=duration,
            help="Timeout for connecting upstream (next hop or application).",
        ),
    ]


def own_ports(settings: Settings) -> frozenset[int]:
    """The ports ztunnel's own listeners use, as Istio's `illegal_ports`: traffic there would loop back into
    ztunnel. A listener that is off owns no port."""
    listeners = (
        settings.inbound_addr or ("", DEFAULT_HBONE_PORT),
        settings.inbound_plaintext_addr or ("", PLAINTEXT_PORT),
        settings.socks5_addr,
        settings.outbound_addr,
    )
    # Port 0 is no port yet: Ztunnel.start adds the one the kernel chose.
    return frozenset(a[1] for a in listeners if a != OFF and a[1] != 0)
