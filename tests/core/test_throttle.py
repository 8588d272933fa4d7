from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core.throttle import MIN_BURST, TokenBucket

MiB = 1024 * 1024


def test_a_frame_may_take_the_bucket_into_debt_and_the_next_one_waits() -> None:
    bucket = TokenBucket(10 * MiB, now=0.0)
    assert bucket.wait(0.0) == 0.0
    bucket.spend(MiB, 0.0)  # larger than the burst: sent, into debt
    debt = MiB - bucket.burst
    assert bucket.wait(0.0) == pytest.approx(debt / (10 * MiB))
    assert bucket.wait(debt / (10 * MiB)) == pytest.approx(0.0)


def test_idle_time_saves_at_most_one_burst() -> None:
    bucket = TokenBucket(MiB, now=0.0)
    bucket.spend(int(bucket.burst), 0.0)
    assert bucket.wait(1000.0) == 0.0
    bucket.spend(int(bucket.burst) + 1, 1000.0)
    assert bucket.wait(1000.0) > 0  # the long idle time did not buy more than the burst


def test_a_new_rate_applies_to_what_is_owed() -> None:
    bucket = TokenBucket(MiB, now=0.0)
    bucket.spend(MiB + MIN_BURST, 0.0)  # owes 1 MiB
    bucket.set_rate(2 * MiB, 0.0)
    assert bucket.wait(0.0) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(64 * 1024, 200 * MiB),
    sizes=st.lists(st.integers(1, 4 * MiB), min_size=20, max_size=200),
)
def test_a_sender_that_obeys_the_bucket_keeps_the_rate(rate: int, sizes: list[int]) -> None:
    """Send frames back to back, each as soon as ``wait`` allows: the bytes sent by time T
    never exceed rate x T + one burst + one frame, and a saturated sender reaches the rate."""
    bucket, now, sent = TokenBucket(rate, now=0.0), 0.0, 0
    for size in sizes:
        now += bucket.wait(now)
        assert sent <= rate * now + bucket.burst + 1
        bucket.spend(size, now)
        sent += size
    owed = bucket.wait(now)
    if owed > 0:  # saturated: once the debt is paid, exactly rate x time + the first burst
        assert sent == pytest.approx(rate * (now + owed) + bucket.burst, rel=1e-6, abs=2.0)
    else:
        assert sent <= rate * now + bucket.burst


def test_spare_spending_uses_credit_but_never_goes_into_debt() -> None:
    bucket = TokenBucket(MiB, now=0.0)
    bucket.spend_spare(100 * MiB, 0.0)  # sent alone, far above the rate: no debt remembered
    assert bucket.balance(0.0) == 0.0
    assert bucket.balance(0.5) == pytest.approx(min(bucket.burst, MiB / 2))  # credit again
    bucket.spend(MiB, 0.5)
    assert bucket.balance(0.5) < 0  # an owed share still counts
