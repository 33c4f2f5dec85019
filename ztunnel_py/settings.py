"""ztunnel's settings: the common ones plus its listeners and Istio's ztunnel flags."""

from __future__ import annotations

from mesh.settings import Setting, common_settings, duration

OFF = "off"


def ztunnel_settings() -> list[Setting]:
    return [
        *common_settings(),
        Setting("NODE_NAME", help="Shared mode: serve the workloads whose `node` is this name."),
        Setting(
            "INBOUND_ADDR",
            help="HBONE listener, e.g. 0.0.0.0:15008 (one ztunnel per network namespace). "
            "Unset: port 15008 on each local workload IP.",
        ),
        Setting(
            "INBOUND_PLAINTEXT_ADDR",
            help="Plaintext inbound capture listener (SO_ORIGINAL_DST). Unset: port "
            "15006 on each local workload IP; `off` disables it.",
        ),
        Setting("SOCKS5_ADDR", default="127.0.0.1:15080", help="SOCKS5 outbound listener; `off` disables it."),
        Setting(
            "OUTBOUND_ADDR",
            default="0.0.0.0:15001",
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
