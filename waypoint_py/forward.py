"""One HTTP request through the waypoint: route it, pick an endpoint for it alone, carry it over HBONE,
retry or time out as its route says, and report it (SPEC §6, §7).

Bodies stream both ways with back-pressure: the request body is pumped upstream by its own task while the
response is awaited (a server may answer before it has read everything), and nothing is held whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hbone.identity import Identity
from mesh.metrics import GRPC_STATUS_CODES, GRPC_UNKNOWN, PeerLabels
from mesh.model import RetryPolicy
from mesh.routing import Hop, RoutingError
from waypoint_py import retry
from waypoint_py.body import RETRY_BODY_LIMIT, BodyCursor, RetainedBody
from waypoint_py.destination import OriginalDestination
from waypoint_py.endpoints import EndpointChooser
from waypoint_py.errors import (
    DownstreamGone,
    DownstreamProtocolError,
    UpstreamConnectFailed,
    UpstreamProtocolError,
    UpstreamReset,
)
from waypoint_py.http_types import Downstream, RequestHead, ResponseHead, Upstream, first
from waypoint_py.routes import NoRoute, RouteTarget, decide
from waypoint_py.telemetry import RequestReport

if TYPE_CHECKING:
    from waypoint_py.proxy import Waypoint

log = logging.getLogger("waypoint.forward")

# Methods that may be sent again after an upstream connection failed before any answer (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# gRPC's mapping of HTTP statuses for responses without grpc-status (gRPC's http-grpc-status-mapping.md);
# anything else, 200 included, is UNKNOWN (2), as Envoy reports it.
_GRPC_OF_HTTP = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}


def _grpc_status(value: bytes) -> str:
    """The status an upstream's `grpc-status` stands for. Its value is the upstream's choice and becomes a metric
    label, so it is one of gRPC's codes (0 to 16): a client reads any other as UNKNOWN (2), and so do we."""
    status = value.decode("latin-1")
    return status if status in GRPC_STATUS_CODES else GRPC_UNKNOWN


def _checked(response: ResponseHead) -> ResponseHead:
    """`response`, if its status is an HTTP status code (three digits, 100 to 599, RFC 9110 §15); otherwise the
    upstream's answer is not HTTP, as a malformed head is not: UpstreamProtocolError (502, UPE). h2 takes any
    digit string for `:status` and h11 any three digits, and the status becomes a metric label."""
    status = response.status
    if not 100 <= status <= 599:
        shown = str(status) if status < 10**9 else "a longer number"
        raise UpstreamProtocolError(f"upstream answered with status {shown}, not an HTTP status code (100-599)")
    return response


@dataclass(frozen=True, slots=True)
class Downstreamer:
    """What the waypoint knows about the client connection a request came on."""

    source: PeerLabels
    principal: Identity | None
    address: str  # the HBONE peer, ip:port
    forwarded_for: str  # the original client, from the CONNECT's `forwarded` header when there is one
    original: OriginalDestination


class _RetryThis(Exception):
    """This attempt's outcome asks for another attempt."""


def _may_resend(head: RequestHead, body: RetainedBody) -> bool:
    """Safe to send again: everything read of the body is kept, and the method is idempotent or the whole
    body was read (and kept) already."""
    return body.replayable and (head.method in _IDEMPOTENT or (body.ended and not body.overflowed))


class Forwarder:
    def __init__(self, waypoint: Waypoint) -> None:
        self.wp = waypoint
        self.chooser = EndpointChooser(waypoint.network)

    def report_bad_request(self, conn: Downstreamer, protocol: str, status: int, why: str) -> None:
        now = time.monotonic()
        report = RequestReport(conn.source, conn.original.service, conn.address, "-", "-", "-", protocol, False, now,
                               response_code=status, error=why)  # fmt: skip
        report.flag("DPE")
        self.wp.telemetry.record(report, now)

    async def handle(self, conn: Downstreamer, ds: Downstream) -> None:
        head = ds.head
        report = RequestReport(conn.source, conn.original.service, conn.address, head.method, head.path,
                               head.authority, ds.protocol, head.is_grpc, time.monotonic())  # fmt: skip
        try:
            await self._route_and_forward(conn, ds, report)
        except DownstreamProtocolError as exc:
            # The request body was malformed: 400, and the connection closes (unless an answer had started).
            with contextlib.suppress(DownstreamGone):
                await self._reply(ds, report, 400, exc.flag, str(exc))
        except DownstreamGone as exc:
            report.flag(exc.flag)
            report.error = report.error or str(exc)
            ds.abort()
        except asyncio.CancelledError:
            # The client connection ended under the request (its session cancels what it still runs); once the
            # answer was given whole or cut off, that changes nothing for the request.
            if not (ds.response_ended or ds.aborted):
                report.flag("DC")
            raise
        finally:
            code = report.response_code
            if report.grpc and report.grpc_status is None and code:
                report.grpc_status = _GRPC_OF_HTTP.get(code, "2")
            self.wp.telemetry.record(report, time.monotonic())

    async def _reply(self, ds: Downstream, report: RequestReport, status: int, flag: str, message: str) -> None:
        report.flag(flag)
        report.error = message
        if ds.response_started:
            ds.abort()
            return
        report.response_code = status
        await ds.send_error(status, message)

    async def _route_and_forward(self, conn: Downstreamer, ds: Downstream, report: RequestReport) -> None:
        if ds.head.method == "CONNECT":
            # A tunnel inside the tunnel would bypass every L7 rule; Envoy's waypoint refuses it as well.
            await self._reply(ds, report, 405, "NR", "CONNECT is not supported inside an HBONE tunnel")
            return
        view = self.wp.view()
        try:
            target = decide(view, conn.original, ds.head)
        except NoRoute as exc:
            await self._reply(ds, report, exc.status, "NR", str(exc))
            return
        if target.service is not None:
            report.service = target.service
        report.route = target.route
        rule = target.rule
        policy = rule.retry if rule is not None else None
        timeouts = rule.timeouts if rule is not None else None
        tries = retry.attempts(policy)
        # Kept even without a retry policy: a request that meets a kept-alive connection the upstream has just
        # closed is sent again on a new one, if its body was small enough to keep.
        body = RetainedBody(ds, RETRY_BODY_LIMIT)
        limit = timeouts.request if timeouts is not None and timeouts.request else None
        try:
            if limit is None:
                await self._attempts(conn, ds, target, body, policy, tries, report)
            else:
                async with asyncio.timeout(limit) as scope:
                    await self._attempts(conn, ds, target, body, policy, tries, report)
        except TimeoutError:
            if limit is None or not scope.expired():
                raise
            await self._reply(ds, report, 504, "UT", f"upstream request timeout ({limit:g}s)")
        finally:
            report.request_bytes = body.consumed

    def _pick(self, target: RouteTarget) -> Hop:
        return self.chooser.pick(self.wp.view(), target)

    async def _attempts(self, conn: Downstreamer, ds: Downstream, target: RouteTarget, body: RetainedBody,
                        policy: RetryPolicy | None, tries: int, report: RequestReport) -> None:  # fmt: skip
        backend_timeout = target.rule.timeouts.backend_request if target.rule and target.rule.timeouts else None
        for attempt in range(tries):
            report.attempts = attempt + 1
            last = attempt + 1 == tries
            try:
                hop = self._pick(target)
            except RoutingError as exc:
                await self._reply(ds, report, 503, "UH", f"no healthy upstream: {exc}")
                return
            try:
                if backend_timeout is None:
                    await self._attempt(conn, ds, hop, body, policy, last, attempt, report)
                else:
                    async with asyncio.timeout(backend_timeout) as per_try:
                        await self._attempt(conn, ds, hop, body, policy, last, attempt, report)
                return
            except _RetryThis:
                pass
            except UpstreamConnectFailed as exc:
                report.error = str(exc)
                if last or not retry.on_connect_failure(policy) or not body.replayable:
                    report.flag("UF")  # Envoy's order: the cause first, then URX
                    if attempt > 0:
                        report.flag("URX")
                    await self._reply(ds, report, 503, "UF", f"upstream connect error: {exc}")
                    return
            except TimeoutError:
                if backend_timeout is None or not per_try.expired():
                    raise
                if last or not retry.on_status(policy, 504) or not body.replayable or ds.response_started:
                    await self._reply(ds, report, 504, "UT", f"upstream per-try timeout ({backend_timeout:g}s)")
                    return
            log.debug("retrying %s %s (attempt %d of %d failed: %s)", ds.head.method, ds.head.path, attempt + 1,
                      tries, report.error)  # fmt: skip
            await asyncio.sleep(retry.backoff(policy, attempt))

    async def _attempt(self, conn: Downstreamer, ds: Downstream, hop: Hop, body: RetainedBody,
                       policy: RetryPolicy | None, last: bool, attempt: int,
                       report: RequestReport) -> None:  # fmt: skip
        view = self.wp.view()
        head = ds.head
        if not head.has_body:
            await body.cursor().next()  # the request's end, at once: nothing to stream, no task to pump it
        fresh = False
        while True:
            lease = await self.wp.upstreams.lease(hop, ds.protocol, view.baggage, conn.forwarded_for, view.state,
                                                  fresh=fresh)  # fmt: skip
            report.destination = lease.destination
            report.upstream = lease.address
            client = lease.client
            pump: asyncio.Task[None] | None = None
            complete = False
            try:
                try:
                    # Without a body, the whole request goes in one write.
                    await client.send_head(head, end=not head.has_body)
                    # A client that gives up (closes, resets its stream) cancels the upstream request at once:
                    # whatever waits for the upstream then fails, and the failure is reported as the client's.
                    ds.watch_gone(client.abort)
                    if head.has_body:
                        pump = asyncio.get_running_loop().create_task(self._pump(body.cursor(), client, body))
                        response = _checked(await self._response_head(client, pump))
                    else:
                        response = _checked(await client.response_head())
                except UpstreamReset as exc:
                    if ds.gone:
                        raise DownstreamGone(f"client went away while waiting for the response ({exc})") from exc
                    if lease.reused and not fresh and client.nothing_received and _may_resend(head, body):
                        # A kept-alive connection the upstream had closed: once more, on a new connection.
                        log.debug("%s %s: kept-alive upstream connection to %s failed (%s); sending it again on a "
                                  "new one", head.method, head.path, lease.address, exc)  # fmt: skip
                        fresh = True
                        continue
                    report.error = str(exc)
                    if not last and retry.on_reset(policy) and body.replayable:
                        raise _RetryThis() from exc
                    report.flag(exc.flag)
                    if attempt > 0:
                        report.flag("URX")
                    await self._reply(ds, report, exc.status, exc.flag, f"upstream reset before the response: {exc}")
                    return
                if retry.on_status(policy, response.status):
                    if not last and body.replayable:
                        report.error = f"upstream answered {response.status}"
                        raise _RetryThis()
                    if attempt > 0:
                        report.flag("URX")
                complete = await self._relay_response(ds, client, response, report)
                return
            finally:
                ds.watch_gone(None)
                if pump is not None:
                    if not pump.done():
                        pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
                lease.release(complete)

    async def _pump(self, cursor: BodyCursor, client: Upstream, body: RetainedBody) -> None:
        while (chunk := await cursor.next()) is not None:
            await client.send_body(chunk)
        await client.end_body(body.trailers)

    async def _response_head(self, client: Upstream, pump: asyncio.Task[None]) -> ResponseHead:
        head_task = asyncio.get_running_loop().create_task(client.response_head())
        try:
            while True:
                waiting = {head_task} if pump.done() else {head_task, pump}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if head_task in done:
                    return head_task.result()
                error = pump.exception()
                if isinstance(error, DownstreamGone):
                    raise error
                # A failed upstream write shows up as a failed response soon enough; keep waiting for it.
        finally:
            if not head_task.done():
                head_task.cancel()
                await asyncio.gather(head_task, return_exceptions=True)

    async def _relay_response(self, ds: Downstream, client: Upstream, response: ResponseHead,
                              report: RequestReport) -> bool:  # fmt: skip
        """Relay the response; True once it is complete (its upstream connection may then be kept)."""
        report.response_code = response.status
        if "URX" not in report.flags:
            report.error = ""  # an earlier attempt's failure is no longer the story
        grpc = first(response.headers, b"grpc-status")  # a trailers-only gRPC answer
        if grpc is not None:
            report.grpc_status = _grpc_status(grpc)
        # What the upstream has already sent goes on together (a small response is one write); before
        # waiting for more, whatever is held goes out.
        await ds.start_response(response, hold=True)
        try:
            while True:
                if not client.body_ready():
                    await ds.flush()
                chunk = await client.read_body()
                if chunk is None:
                    break
                report.response_bytes += len(chunk)
                await ds.send_body(chunk, hold=True)
        except UpstreamReset as exc:
            if ds.gone:
                raise DownstreamGone(f"client went away in the middle of the response ({exc})") from exc
            report.flag(exc.flag)
            report.error = f"upstream reset in the middle of the response: {exc}"
            ds.abort()
            return False
        trailers = client.trailers
        if trailers:
            grpc = first(trailers, b"grpc-status")
            if grpc is not None:
                report.grpc_status = _grpc_status(grpc)
        await ds.end_response(trailers)
        return True
