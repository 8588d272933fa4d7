"""Chart rates come from two real answers; a restarted daemon's counters give no rate."""

from __future__ import annotations

from typing import Any

import pytest

from volkeeper.gui.rates import Samples


def answer(written: int, sent: int, wire: int) -> dict[str, Any]:
    mirror = {"job": "web", "target": "beta:data1", "role": "source", "sent_bytes": sent,
              "wire_bytes": wire}  # fmt: skip
    target_side = {"job": "db", "target": "alpha:data9", "role": "target", "sent_bytes": None}
    return {"volumes": [{"name": "data1", "written_bytes": written}],
            "mirrors": [mirror, target_side]}  # fmt: skip


def test_rates_between_answers_and_the_compression_ratio() -> None:
    samples = Samples()
    samples.add(10.0, answer(0, 0, 0))
    samples.add(12.0, answer(4000, 4000, 1000))
    samples.add(13.0, answer(4000, 4000, 1000))
    first, idle = samples.job_rates("web", "data1")
    assert (first.time, first.app_bytes_per_s, first.payload_bytes_per_s) == (12.0, 2000, 2000)
    assert first.wire_bytes_per_s == 500 and first.compression_ratio == pytest.approx(4.0)
    assert idle.app_bytes_per_s == 0 and idle.compression_ratio is None
    assert samples.job_rates("other", "data1") == [
        r for r in samples.job_rates("other", "data1") if r.payload_bytes_per_s == 0
    ]


def test_a_restart_between_two_answers_gives_no_rate_for_that_step() -> None:
    samples = Samples()
    samples.add(1.0, answer(9000, 9000, 9000))
    samples.add(2.0, answer(100, 100, 100))  # the daemon started again: counters from zero
    samples.add(3.0, answer(600, 600, 300))
    assert [r.time for r in samples.job_rates("web", "data1")] == [3.0]


def test_only_the_last_answers_are_kept() -> None:
    samples = Samples(keep=3)
    for n in range(10):
        samples.add(float(n), answer(n, n, n))
    assert [r.time for r in samples.job_rates("web", "data1")] == [8.0, 9.0]
