"""Errors of the HBONE layer. Each carries the Istio `response_flags` value it is reported with."""

from __future__ import annotations

from h2.errors import ErrorCodes


class HboneError(Exception):
    """Base class; `flag` is the metric's response_flags value for this failure."""

    flag = "CONNECT"


class TlsFailure(HboneError):
    """The TLS handshake failed: no or bad certificate, unknown root, expired, wrong version or ALPN."""

    flag = "TLS_FAILURE"


class WrongIdentity(HboneError):
    """The handshake worked but the peer's SPIFFE identity is not acceptable."""

    flag = "IDENTITY_ERROR"


class H2HandshakeFailure(HboneError):
    """TLS is up but the HTTP/2 prefaces and SETTINGS were not exchanged."""

    flag = "H2_HANDSHAKE_FAILURE"


class ConnectFailed(HboneError):
    """The TCP connection to the next hop failed or timed out."""

    flag = "CONNECT"


class ConnectRefused(HboneError):
    """The server answered the CONNECT with a status other than 200."""

    flag = "CONNECT"

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"CONNECT refused with status {status}")
        self.status = status
        if status == 401:
            self.flag = "DENY"


class StreamReset(HboneError):
    """The peer reset the stream, or the connection carrying it was lost."""

    flag = "CONNECT"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ConnectionClosed(HboneError):
    """The HTTP/2 connection is closing (GOAWAY) or closed, so no new stream can be opened on it."""

    flag = "CONNECT"


def code_name(code: int) -> str:
    """An HTTP/2 error code's name (`CANCEL`), or its number when it has none."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
