"""The GCRA limiter (`proxy/limits.py`) on a simulated clock: bursts, the steady rate, no edge bursts, settling."""

from __future__ import annotations

import pytest

from proxy.limits import Limit, LocalLimits


def test_a_burst_then_the_steady_rate() -> None:
    limits, limit = LocalLimits(), Limit(rate=60, burst=10)  # one a second, ten at once
    decisions = [limits.take("k", limit, now=100.0) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions[:3]] == [9, 8, 7] and decisions[9].remaining == 0
    refused = decisions[10]
    assert refused.retry_after_s == pytest.approx(1.0) and refused.reset_s == pytest.approx(10.0)
    assert not limits.take("k", limit, now=100.99).allowed
    assert limits.take("k", limit, now=101.0).allowed  # one more a second from then on
    assert not limits.take("k", limit, now=101.5).allowed
    assert limits.take("k", limit, now=102.0).allowed


def test_no_minute_edge_lets_twice_the_rate_through() -> None:
    """A fixed window allows a full minute's worth just before and again just after its edge; GCRA spreads it."""
    limits, limit = LocalLimits(), Limit(rate=60, burst=5)
    allowed = 0
    t = 0.0
    while t < 120.0:  # a client that asks ten times a second for two minutes
        allowed += limits.take("k", limit, now=t).allowed
        t = round(t + 0.1, 3)
    assert allowed <= 5 + 120 + 1  # the burst, then one a second
    edge = sum(limits.take("k2", limit, now=59.5 + i * 0.01).allowed for i in range(100))  # 59.5 s - 60.5 s
    assert edge == 5  # only the burst, whatever the clock says about minutes


def test_token_costs_and_settling_the_reservation() -> None:
    limits, limit = LocalLimits(), Limit(rate=6000)  # tokens a minute: 100 a second, burst a minute's worth
    assert limits.take("t", limit, now=0.0, cost=5000).allowed  # reserved from the estimate
    assert not limits.take("t", limit, now=0.0, cost=1500).allowed
    limits.settle("t", limit, now=1.0, reserved=5000, used=200)  # the answer was short: 4,800 come back
    after = limits.take("t", limit, now=1.0, cost=1500)
    assert after.allowed and after.remaining == 6000 - 200 - 1500 + 100  # one second refilled 100
    limits.settle("t", limit, now=1.0, reserved=1500, used=3000)  # longer than estimated: the rest is taken
    assert limits.take("t", limit, now=1.0, cost=1).remaining == 6000 - 200 - 3000 + 100 - 1


def test_settling_never_credits_beyond_a_full_bucket() -> None:
    limits, limit = LocalLimits(), Limit(rate=60)
    limits.take("k", limit, now=0.0, cost=10)
    limits.settle("k", limit, now=100.0, reserved=10, used=0)  # long after: the bucket is full already
    assert limits.take("k", limit, now=100.0, cost=60).allowed and not limits.take("k", limit, now=100.0).allowed


def test_keys_are_apart_and_empty_buckets_are_forgotten() -> None:
    limits, limit = LocalLimits(), Limit(rate=60, burst=1)
    assert limits.take("a", limit, now=0.0).allowed and limits.take("b", limit, now=0.0).allowed
    assert not limits.take("a", limit, now=0.0).allowed
    limits._prune(now=10.0)
    assert limits._tat == {}
