"""The h11 figure the waypoint benchmark reports for reference must drive h11 through a real proxied exchange
(what it times is only meaningful if every request and response really goes through both connections)."""

import h11

from bench import h11cost


def test_each_round_forwards_the_request_and_the_response_whole() -> None:
    downstream, upstream = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    for _ in range(3):  # kept alive: every round is a new cycle on the same two connections
        written = h11cost._proxy_one(downstream, upstream)
        assert written == len(h11cost.REQUEST) + len(h11cost.RESPONSE)
    assert downstream.our_state is h11.IDLE and upstream.our_state is h11.IDLE


def test_the_figure_comes_from_requests_actually_run() -> None:
    # Only that some CPU was measured over the requests run: how much is the bench's business, not the tests'.
    assert h11cost.cpu_per_1000_requests(seconds=0.05) > 0.0
