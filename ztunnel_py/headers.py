"""The CONNECT request headers ztunnel sends (SPEC §3.3) and reads back."""

from __future__ import annotations

import secrets

from hbone.authority import format_authority

X_FORWARDED_NETWORK = "x-forwarded-network"


def traceparent() -> str:
    """A fresh W3C traceparent per connection (not propagated from the application, as ztunnel does)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"


def forwarded(client: tuple[str, int], service_hostname: str | None) -> str:
    value = f'for="{format_authority(client[0], client[1])}"'
    if service_hostname:
        value += f";host={service_hostname}"
    return value


def parse_forwarded_host(value: str | None) -> str | None:
    """The `host=` of a `forwarded` header, which names the service the client meant."""
    if not value:
        return None
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, val = pair.strip().partition("=")
            if key.strip().lower() == "host" and val:
                return val.strip().strip('"').lower()
    return None


def connect_headers(baggage: str, client: tuple[str, int], service_hostname: str | None) -> list[tuple[str, str]]:
    headers = []
    if baggage:
        headers.append(("baggage", baggage))
    headers.append(("forwarded", forwarded(client, service_hostname)))
    headers.append(("traceparent", traceparent()))
    return headers
