"""Why a request failed, each with the Envoy response flag it is reported with (SPEC §7)."""

from __future__ import annotations


class ProxyError(Exception):
    flag = "-"


class UpstreamConnectFailed(ProxyError):
    """No usable stream to the chosen endpoint: TCP, TLS, identity or the CONNECT itself failed."""

    flag = "UF"


class UpstreamReset(ProxyError):
    """The upstream stream ended or broke before the response was complete."""

    flag = "UR"


class UpstreamProtocolError(UpstreamReset):
    """The upstream answered with something that is not valid HTTP."""

    flag = "UPE"


class DownstreamGone(ProxyError):
    """The client went away (or its stream was reset) while the request was in flight."""

    flag = "DC"


class DownstreamProtocolError(DownstreamGone):
    """The client sent malformed HTTP in the middle of a request."""

    flag = "DPE"
