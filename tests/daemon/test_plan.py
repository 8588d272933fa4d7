from __future__ import annotations

import pytest

from volkeeper.daemon.plan import rate_summary


def test_rate_summary() -> None:
    rates = [float(r) for r in range(1, 21)]  # 1..20 bytes/s
    summary = rate_summary(rates)
    assert summary["average_bytes_per_s"] == pytest.approx(10.5)
    assert summary["p95_bytes_per_s"] == 20.0
    assert summary["peak_bytes_per_s"] == 20.0
    assert rate_summary([]) == {
        "average_bytes_per_s": 0.0, "p95_bytes_per_s": 0.0, "peak_bytes_per_s": 0.0
    }  # fmt: skip
