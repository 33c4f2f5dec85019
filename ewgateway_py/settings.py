"""The gateway's settings: the common daemon settings, its own listener, and a required identity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mesh.settings import Setting, Settings, addr, common_settings, load

COMPONENT = "eastwestgateway"


def gateway_settings() -> list[Setting]:
    settings: list[Setting] = []
    for s in common_settings():
        if s.env == "PROXY_WORKLOAD_INFO":
            # The gateway presents this identity to every client; without it there is no certificate to serve.
            s = dataclasses.replace(s, required=True, help="The gateway's own workload, namespace/name/service-"
                                    "account (e.g. istio-system/istio-eastwestgateway/istio-eastwestgateway).")
        settings.append(s)
    settings.append(Setting("INBOUND_ADDR", default="0.0.0.0:15008", type=addr,
                            help="HBONE listener for double-HBONE traffic from other networks."))
    return settings


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    return load(
        gateway_settings(),
        argv,
        prog="ewgateway-py",
        description="East-west gateway: accepts double HBONE from other networks on 15008 and relays each "
        "inner tunnel, unopened, to a local endpoint's ztunnel (or the service's waypoint).",
    )
