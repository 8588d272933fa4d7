"""``make soak``: nemesis runs with random seeds for a while, then a report.

How this works: ``python -m tests.fault.soak --seconds N [--report DIR]`` runs one nemesis
run after another (tests/fault/nemesis.py), each with a fresh seed drawn from the clock and
a topology and mode in turn (two nodes sync, two nodes async, three nodes sync),
until N seconds have passed.  ``--seed S`` (with ``--nodes``, ``--mode``, ``--faults``) runs
one given schedule again instead.  Every run's report is printed as it ends and kept in
DIR/runs.jsonl; DIR/report.md sums them up: runs, faults by kind, anomalies, recovery time
per fault kind (p50/p99), bytes resynced per fault kind, the application's longest wait.
Each run works in a directory of its own under DIR, removed when the run found nothing.  A
run the harness itself could not finish (an exception) counts as an anomaly, and the soak
goes on with the next seed.
The exit status is 1 if any run found an anomaly.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

from tests.fault.checker import Anomaly
from tests.fault.nemesis import RunReport, RunSpec, run
from tests.fault.schedule import schedule

SHAPES = [(2, "sync"), (2, "async"), (3, "sync")]


def spec_for(seed: int, run_number: int, faults: int) -> RunSpec:
    """Shapes in turn, so a soak of any length covers each (a report names the shape)."""
    nodes, mode = SHAPES[run_number % len(SHAPES)]
    return RunSpec(seed=seed, nodes=nodes, mode=mode, faults=faults)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make soak")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--faults", type=int, default=12, help="faults per run")
    parser.add_argument("--seed", type=int, help="run this seed's schedule once")
    parser.add_argument("--nodes", type=int, choices=(2, 3))
    parser.add_argument("--mode", choices=("sync", "async"))
    parser.add_argument("--report", type=Path, default=Path("soak-report"))
    args = parser.parse_args(argv)
    args.report = args.report.resolve()  # the nodes' configs want absolute paths
    args.report.mkdir(parents=True, exist_ok=True)
    reports: list[RunReport] = []
    deadline = time.monotonic() + args.seconds
    seeds = random.SystemRandom()
    while not reports or (args.seed is None and time.monotonic() < deadline):
        seed = args.seed if args.seed is not None else seeds.randrange(1, 1 << 31)
        spec = spec_for(seed, len(reports), args.faults)
        if args.nodes or args.mode:
            spec = RunSpec(seed, args.nodes or spec.nodes, args.mode or spec.mode, args.faults)
        directory = args.report / f"run-{seed}"
        try:
            report = run(spec, directory)
        except Exception as error:  # the harness failed: say so, keep the run's files, go on
            report = RunReport(spec, schedule(seed, spec.faults, spec.nodes - 1, spec.kinds))
            report.anomalies.append(Anomaly("harness error", f"seed {seed}", repr(error)))
            traceback.print_exc()
        print(report, flush=True)
        reports.append(report)
        with (args.report / "runs.jsonl").open("a") as runs:
            runs.write(json.dumps(report.as_dict()) + "\n")
        if not report.anomalies:
            shutil.rmtree(directory, ignore_errors=True)
    (args.report / "report.md").write_text(summary(reports, args.seconds))
    print(summary(reports, args.seconds))
    return 1 if any(r.anomalies for r in reports) else 0


def summary(reports: list[RunReport], seconds: float) -> str:
    faults: dict[str, int] = defaultdict(int)
    recovery: dict[str, list[float]] = defaultdict(list)
    resynced: dict[str, list[int]] = defaultdict(list)
    waits: dict[str, float] = defaultdict(float)
    for report in reports:
        for record in report.records:
            faults[record.kind] += 1
            if record.recovery_s is not None:
                recovery[record.kind].append(record.recovery_s)
            resynced[record.kind].append(record.resync_bytes)
            waits[record.kind] = max(waits[record.kind], record.longest_wait_s)
    anomalies = [f"- seed {r.spec.seed}: {a}" for r in reports for a in r.anomalies]
    lines = [
        f"# Soak report: {len(reports)} runs in {seconds:.0f} s",
        "",
        f"{sum(faults.values())} faults; {sum(r.writes for r in reports)} writes and "
        f"{sum(r.flushes for r in reports)} flushes acknowledged; "
        f"{sum(r.looks for r in reports)} checker looks; {len(anomalies)} anomalies.",
        "",
        "| fault | count | recovery p50 (s) | recovery p99 (s) | resynced per fault, median "
        "| max | longest client wait (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for kind in sorted(faults):
        times = sorted(recovery[kind])
        lines.append(
            f"| {kind} | {faults[kind]} | {_quantile(times, 0.5)} | {_quantile(times, 0.99)} | "
            f"{_size(statistics.median(resynced[kind]))} | {_size(max(resynced[kind]))} | "
            f"{waits[kind]:.2f} |"
        )
    lines += ["", "## Anomalies", "", *(anomalies or ["none"]), ""]
    return "\n".join(lines)


def _quantile(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.2f}"


def _size(count: float) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count / 1024:.0f} KiB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
