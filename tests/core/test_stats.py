"""VolumeStats.record and OpStats.cumulative_buckets: counts, bytes, errors, histogram buckets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core.stats import LATENCY_BUCKETS, OPS, OpStats, RateMeter, VolumeStats

EXPECTED_BOUNDS = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
]  # fmt: skip


def test_buckets_and_ops() -> None:
    assert list(LATENCY_BUCKETS) == EXPECTED_BOUNDS
    assert OPS == ("read", "write", "flush", "trim", "zero", "cache")
    stats = VolumeStats()
    assert set(stats.ops) == set(OPS)
    for op in OPS:
        s = stats.ops[op]
        assert (s.requests, s.errors, s.bytes, s.seconds) == (0, 0, 0, 0.0)
        assert s.buckets == [0] * 17


def test_record_counts_bytes_and_errors_per_op() -> None:
    stats = VolumeStats()
    stats.record("write", 4096, 0.001)
    stats.record("write", 512, 0.003)
    stats.record("write", 0, 0.5, failed=True)
    stats.record("read", 65536, 0.0002)
    w, r = stats.ops["write"], stats.ops["read"]
    assert (w.requests, w.errors, w.bytes) == (3, 1, 4608)
    assert w.seconds == pytest.approx(0.504)
    assert (r.requests, r.errors, r.bytes) == (1, 0, 65536)
    assert r.seconds == pytest.approx(0.0002)
    for op in ("flush", "trim", "zero", "cache"):
        assert stats.ops[op].requests == 0
        assert sum(stats.ops[op].buckets) == 0


def test_ops_do_not_share_state() -> None:
    a, b = VolumeStats(), VolumeStats()
    a.record("flush", 0, 0.01)
    assert b.ops["flush"].requests == 0
    assert a.ops["trim"].buckets is not a.ops["flush"].buckets


def test_unknown_op_is_rejected() -> None:
    with pytest.raises(KeyError):
        VolumeStats().record("discard", 0, 0.0)


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.00001, 0),
        (0.00005, 0),  # a bound belongs to its own bucket ("le", less than or equal)
        (0.0000501, 1),
        (0.0001, 1),
        (0.00010001, 2),
        (0.001, 4),
        (0.0011, 5),
        (0.1, 10),
        (1.0, 13),
        (1.0000001, 14),
        (2.5, 14),
        (10.0, 15),
        (10.000001, 16),  # +Inf
        (3600.0, 16),
        (math.inf, 16),
    ],
)
def test_histogram_bucket_placement(seconds: float, bucket: int) -> None:
    stats = VolumeStats()
    stats.record("read", 512, seconds)
    expected = [0] * 17
    expected[bucket] = 1
    assert stats.ops["read"].buckets == expected


@pytest.mark.parametrize("index", range(len(EXPECTED_BOUNDS)))
def test_every_bound_is_inclusive(index: int) -> None:
    s = OpStats()
    stats = VolumeStats(ops={"read": s})
    stats.record("read", 0, EXPECTED_BOUNDS[index])
    stats.record("read", 0, math.nextafter(EXPECTED_BOUNDS[index], math.inf))
    assert s.buckets[index] == 1
    assert s.buckets[index + 1] == 1


def test_cumulative_buckets_example() -> None:
    stats = VolumeStats()
    for seconds in (0.00004, 0.0003, 0.0003, 0.02, 5.0, 11.0):
        stats.record("zero", 1, seconds)
    cumulative = stats.ops["zero"].cumulative_buckets()
    assert [b for b, _ in cumulative] == [*EXPECTED_BOUNDS, math.inf]
    assert dict(cumulative) == {
        0.00005: 1, 0.0001: 1, 0.00025: 1, 0.0005: 3, 0.001: 3, 0.0025: 3, 0.005: 3,
        0.01: 3, 0.025: 4, 0.05: 4, 0.1: 4, 0.25: 4, 0.5: 4, 1.0: 4, 2.5: 4, 10.0: 5,
        math.inf: 6,
    }  # fmt: skip


def test_cumulative_buckets_empty() -> None:
    cumulative = OpStats().cumulative_buckets()
    assert len(cumulative) == 17
    assert all(count == 0 for _, count in cumulative)
    assert cumulative[-1] == (math.inf, 0)


LATENCY = st.one_of(
    st.floats(min_value=0.0, max_value=20.0),
    st.sampled_from(EXPECTED_BOUNDS),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(0, 2**25), LATENCY, st.booleans()),
        max_size=40,
    )
)
def test_record_matches_a_model(observations: list[tuple[str, int, float, bool]]) -> None:
    stats = VolumeStats()
    for op, nbytes, seconds, failed in observations:
        stats.record(op, nbytes, seconds, failed=failed)
    for op in OPS:
        mine = [(n, s, f) for o, n, s, f in observations if o == op]
        s = stats.ops[op]
        assert s.requests == len(mine)
        assert s.errors == sum(f for _, _, f in mine)
        assert s.bytes == sum(n for n, _, _ in mine)
        assert s.seconds == pytest.approx(sum(x for _, x, _ in mine))
        cumulative = s.cumulative_buckets()
        assert cumulative[-1] == (math.inf, s.requests)
        for bound, count in cumulative:
            assert count == sum(1 for _, x, _ in mine if x <= bound)
        counts = [c for _, c in cumulative]
        assert counts == sorted(counts)


def test_rate_meter_measures_over_its_window() -> None:
    meter = RateMeter(window=5.0, spacing=0.25)
    assert meter.rate(0.0, 0) == 0.0
    for second in range(11):  # 100 bytes/s for 10 s
        meter.sample(float(second), 100 * second)
        meter.sample(second + 0.1, 100 * second)  # closer than spacing: ignored
    assert meter.rate(10.0, 1000) == pytest.approx(100.0)
    # The total stops growing: the rate falls as the window slides past the growth.
    assert meter.rate(14.0, 1000) == pytest.approx((1000 - 900) / (14 - 9))
    assert meter.rate(20.0, 1000) == 0.0
