"""The CPU `h11` alone needs for one request through an HTTP/1.1 proxy: a reference for the waypoint's figure.

For every request the waypoint parses the client's request (Request, EndOfMessage), writes it upstream
(Request, EndOfMessage), parses the upstream's response (Response, Data, EndOfMessage) and writes it to the
client (Response, Data, EndOfMessage): eleven h11 events on two `h11.Connection`s, both kept alive from
request to request. This module runs that sequence in this process with the bench's own request (from
`bench.workers.http_load`) and response (from `bench.workers.http_server`), and nothing else: no sockets,
no HBONE, no routing, no telemetry.

The figure is CPU seconds per 1000 requests, the unit of the waypoint's column, so the two compare directly.
It is measured on a warm interpreter in a tight loop, so it is a lower bound of what h11 costs inside the
daemon, where every request also finds colder caches.
"""

from __future__ import annotations

import time

import h11

REQUEST = b"GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\nuser-agent: bench\r\n\r\n"
RESPONSE_SIZE = 1024
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n"
    b"connection: keep-alive\r\n\r\n" % RESPONSE_SIZE
) + b"x" * RESPONSE_SIZE
_END = h11.EndOfMessage()


def _proxy_one(downstream: h11.Connection, upstream: h11.Connection) -> int:
    """One request through both connections, as the waypoint drives h11; returns the bytes written."""
    downstream.receive_data(REQUEST)
    request = downstream.next_event()
    if type(request) is not h11.Request or type(downstream.next_event()) is not h11.EndOfMessage:
        raise RuntimeError("h11 did not parse the bench's request")
    headers = [(b"host", b"10.0.0.1:80"), *((k, v) for k, v in request.headers if k != b"host")]
    sent = len(upstream.send(h11.Request(method=request.method, target=request.target, headers=headers)))
    sent += len(upstream.send(_END))
    upstream.receive_data(RESPONSE)
    response, data, end = upstream.next_event(), upstream.next_event(), upstream.next_event()
    if type(response) is not h11.Response or type(data) is not h11.Data or type(end) is not h11.EndOfMessage:
        raise RuntimeError("h11 did not parse the bench's response")
    reply = h11.Response(status_code=response.status_code, headers=list(response.headers), reason=b"OK")
    sent += len(downstream.send(reply))
    sent += sum(map(len, downstream.send_with_data_passthrough(h11.Data(data=data.data))))
    sent += len(downstream.send(_END))
    downstream.start_next_cycle()
    upstream.start_next_cycle()
    return sent


def cpu_per_1000_requests(seconds: float = 1.0) -> float:
    """CPU seconds h11 takes for 1000 proxied requests (median of five rounds of about `seconds`/5)."""
    downstream, upstream = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    for _ in range(500):  # warm up: imports, caches, the specializing interpreter
        _proxy_one(downstream, upstream)
    rounds = []
    for _ in range(5):
        n, start, deadline = 0, time.process_time(), time.monotonic() + seconds / 5
        while time.monotonic() < deadline:
            for _ in range(100):
                _proxy_one(downstream, upstream)
            n += 100
        rounds.append(1000 * (time.process_time() - start) / n)
    rounds.sort()
    return rounds[len(rounds) // 2]
