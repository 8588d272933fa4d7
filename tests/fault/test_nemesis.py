"""The nemesis in make test: a few fixed seeds, each a short schedule of random faults.

What this proves: under every kind of fault the harness knows (tests/fault/schedule.py), on a
sync and an async job of two nodes and a sync job of three, every claim a node makes is true
of the copies (tests/fault/checker.py), no acknowledged write is lost or reordered, every
fault recovers without a full resync, and the application sees no failed write and no wait
beyond the peer timeout when a target's side fails.  A failure prints the seed and the
schedule; ``SEED=N MODE=M NODES=K make soak`` runs that schedule again (see docs/testing.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.nemesis import RunSpec, run

FIXED = [
    RunSpec(seed=11, nodes=2, mode="sync", faults=7),
    RunSpec(seed=12, nodes=2, mode="async", faults=7),
    RunSpec(seed=13, nodes=3, mode="sync", faults=6),
    RunSpec(
        seed=14,
        nodes=2,
        mode="sync",
        faults=6,
        kinds=[
            "failover",
            "switchover",
            "power_cut_source",
            "hang_disk_target",
            "partition",
            "freeze_target",
        ],
    ),
]


@pytest.mark.parametrize("spec", FIXED, ids=lambda s: f"seed{s.seed}-{s.nodes}n-{s.mode}")
@pytest.mark.usefixtures("nemesis_host")
def test_no_acknowledged_write_is_lost_under_random_faults(spec: RunSpec, tmp_path: Path) -> None:
    report = run(spec, tmp_path)
    print(report)
    assert not report.anomalies, str(report)
    assert len(report.records) == len(report.schedule), str(report)
    assert report.writes > 100 * len(report.schedule), str(report)
    assert report.looks >= len(report.schedule), str(report)
