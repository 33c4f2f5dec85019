"""Why a request failed, each with the Envoy response flag it is reported with (SPEC §7), and for upstream
failures before any response the status the client gets (as Envoy answers)."""

from __future__ import annotations


class ProxyError(Exception):
    flag = "-"


class UpstreamConnectFailed(ProxyError):
    """No usable stream to the chosen endpoint: TCP, TLS, identity or the CONNECT itself failed."""

    flag = "UF"


class UpstreamReset(ProxyError):
    """The upstream stream ended or broke before the response was complete."""

    flag = "UR"
    status = 503


class UpstreamClosed(UpstreamReset):
    """The upstream HTTP/1.1 connection ended (closed or lost) before the response was complete: Envoy's
    "upstream connection termination", where UR is an HTTP/2 stream reset."""

    flag = "UC"


class UpstreamProtocolError(UpstreamReset):
    """The upstream answered with something that is not valid HTTP."""

    flag = "UPE"
    status = 502


class DownstreamGone(ProxyError):
    """The client went away (or its stream was reset) while the request was in flight."""

    flag = "DC"


class DownstreamProtocolError(DownstreamGone):
    """The client sent malformed HTTP in the middle of a request."""

    flag = "DPE"
