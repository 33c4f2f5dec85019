"""One HTTP request through the waypoint: route it, pick an endpoint for it alone, carry it over HBONE,
retry or time out as its route says, and report it (SPEC §6, §7).

Bodies stream both ways with back-pressure: the request body is pumped upstream by its own task while the
response is awaited (a server may answer before it has read everything), and nothing is held whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hbone.identity import Identity
from mesh.metrics import PeerLabels
from mesh.model import RetryPolicy
from mesh.routing import Hop, Router, RoutingError
from waypoint_py import retry
from waypoint_py.body import RETRY_BODY_LIMIT, BodyCursor, RetainedBody
from waypoint_py.destination import OriginalDestination
from waypoint_py.errors import DownstreamGone, UpstreamConnectFailed, UpstreamReset
from waypoint_py.http_types import Downstream, ResponseHead, Upstream, first
from waypoint_py.routes import NoRoute, RouteTarget, decide
from waypoint_py.telemetry import RequestReport
from waypoint_py.upstream_h1 import Http1Upstream
from waypoint_py.upstream_h2 import Http2Upstream

if TYPE_CHECKING:
    from waypoint_py.proxy import Waypoint

log = logging.getLogger("waypoint.forward")

# gRPC's mapping of HTTP statuses for responses without grpc-status (gRPC's http-grpc-status-mapping.md).
_GRPC_OF_HTTP = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}


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


class Forwarder:
    def __init__(self, waypoint: Waypoint) -> None:
        self.wp = waypoint

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
        except DownstreamGone as exc:
            report.flag(exc.flag)
            report.error = report.error or str(exc)
            ds.abort()
        except asyncio.CancelledError:
            report.flag("DC")
            raise
        finally:
            code = report.response_code
            if report.grpc and report.grpc_status is None and code:
                report.grpc_status = "0" if code == 200 else _GRPC_OF_HTTP.get(code, "2")
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
        body = RetainedBody(ds, RETRY_BODY_LIMIT if tries > 1 else 0)
        limit = timeouts.request if timeouts is not None and timeouts.request else None
        try:
            async with asyncio.timeout(limit) as scope:
                await self._attempts(conn, ds, target, body, policy, tries, report)
        except TimeoutError:
            if not scope.expired():
                raise
            await self._reply(ds, report, 504, "UT", f"upstream request timeout ({limit:g}s)")
        finally:
            report.request_bytes = body.consumed

    def _pick(self, target: RouteTarget) -> Hop:
        view = self.wp.view()
        router = Router(view.state, self.wp.network)
        if target.service is None or target.workload is not None:
            assert target.workload is not None
            return router.route_workload(view.workload, target.workload, target.ip, target.port,
                                         skip_waypoint_of=self.wp.identity)  # fmt: skip
        return router.route_service(view.workload, target.service, target.port, skip_waypoint_of=self.wp.identity)

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
                if not per_try.expired():
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
        up = await self.wp.dialer.open(hop, view.baggage, conn.forwarded_for)
        report.destination = up.destination
        report.upstream = up.address
        client: Upstream = Http2Upstream(up.reader, up.writer) if ds.protocol == "HTTP/2" else \
            Http1Upstream(up.reader, up.writer)  # fmt: skip
        pump: asyncio.Task[None] | None = None
        try:
            try:
                await client.send_head(ds.head)
                pump = asyncio.get_running_loop().create_task(self._pump(body.cursor(), client, body))
                response = await self._response_head(client, pump)
            except UpstreamReset as exc:
                report.error = str(exc)
                if not last and retry.on_reset(policy) and body.replayable:
                    raise _RetryThis() from exc
                report.flag(exc.flag)
                if attempt > 0:
                    report.flag("URX")
                await self._reply(ds, report, 503, exc.flag, f"upstream reset before the response: {exc}")
                return
            if retry.on_status(policy, response.status):
                if not last and body.replayable:
                    report.error = f"upstream answered {response.status}"
                    raise _RetryThis()
                if attempt > 0:
                    report.flag("URX")
            await self._relay_response(ds, client, response, report)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if pump is not None:
                await asyncio.gather(pump, return_exceptions=True)
            if isinstance(client, Http2Upstream):
                await client.close()
            up.close()

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
                              report: RequestReport) -> None:  # fmt: skip
        report.response_code = response.status
        if "URX" not in report.flags:
            report.error = ""  # an earlier attempt's failure is no longer the story
        grpc = first(response.headers, b"grpc-status")  # a trailers-only gRPC answer
        if grpc is not None:
            report.grpc_status = grpc.decode("latin-1")
        await ds.start_response(response)
        try:
            while (chunk := await client.read_body()) is not None:
                report.response_bytes += len(chunk)
                await ds.send_body(chunk)
        except UpstreamReset as exc:
            report.flag(exc.flag)
            report.error = f"upstream reset in the middle of the response: {exc}"
            ds.abort()
            return
        trailers = client.trailers
        if trailers:
            grpc = first(trailers, b"grpc-status")
            if grpc is not None:
                report.grpc_status = grpc.decode("latin-1")
        await ds.end_response(trailers)
