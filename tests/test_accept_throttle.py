"""The "accept failed" warning of the HBONE listener while out of file descriptors: the accept loop retries
ten times a second, and each retry used to log a line (80 lines in 8 s in the audit). Time is an argument
of the throttle, so the rule is checked without waiting."""

from __future__ import annotations

from hbone.server import ACCEPT_RETRY, ACCEPT_WARNING_INTERVAL, Throttle


def test_a_failure_that_repeats_is_logged_once_per_interval_with_a_count() -> None:
    throttle = Throttle(ACCEPT_WARNING_INTERVAL)
    # Eight seconds of retries: one warning, at the first failure.
    retries = [i * ACCEPT_RETRY for i in range(80)]
    assert [throttle.hit(t) for t in retries] == [0] + [None] * 79
    # Once the interval has passed, the next failure is logged with how many were held back.
    assert throttle.hit(ACCEPT_WARNING_INTERVAL) == 79
    assert throttle.hit(ACCEPT_WARNING_INTERVAL + ACCEPT_RETRY) is None
    # A failure long after the last one is logged at once, with nothing held back.
    assert throttle.hit(10 * ACCEPT_WARNING_INTERVAL) == 1
    assert throttle.hit(20 * ACCEPT_WARNING_INTERVAL) == 0
