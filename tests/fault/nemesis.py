"""One nemesis run: a cluster, a writer, a schedule of faults, and the checker after each.

How this works: ``run(RunSpec, directory)`` starts a ``FaultCluster`` (2 or 3 nodes), creates a
job from the first node's volume to the others' in ``mode``, waits for Mirroring and starts
the libnbd writer.  Then, for each fault of ``schedule(seed, ...)``:

1. the fault is done (``Nemesis.strike``), on the node that holds the role it names now;
2. it lasts ``duration`` seconds while the writer writes;
3. if the writer can be paused (it cannot while the source hangs), the checker looks
   (``Checker.look``: every status claim against every image), and the writer goes on;
4. the fault is healed, and the run waits until everything converged again (every node
   answers, every mirror Mirroring with nothing out of sync, every target UpToDate): the
   time that took is the fault's recovery time;
5. with the writer paused the checker looks again and proves every copy identical.

Per fault the run records what the application saw while it lasted (its longest wait for
an answer, its failed requests: a fault on a target's side must cause none, and no wait
longer than the peer timeout plus one ping interval and ``STALL_SLACK``), the bytes
resynced (with the writer going on, a resync resends what it writes meanwhile, so this can
exceed the writer's span), and whether a resync was full -- the daemon logs "full resync" or
"all marked" whenever it marks every region -- allowed only after a Broken or Split brain state.
A fault that does not converge in ``RECOVERY_TIMEOUT`` is an anomaly and ends the run.
Everything lands in a ``RunReport``; ``str(report)`` names the seed and the schedule, which
is all it takes to run the same faults again (``SEED=N make soak``, or
``tests/fault/test_nemesis.py``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault.checker import Anomaly, Checker
from tests.fault.cluster import FaultCluster
from tests.fault.schedule import TARGET_SIDE, Fault, describe, schedule
from tests.fault.strikes import Nemesis
from tests.fault.workload import Workload

MiB = 1 << 20
NAMES = ["alpha", "beta", "gamma"]
PEER_TIMEOUT = 3.0  # the nodes' [node] peer_timeout in a run (seconds)
PING_INTERVAL = min(2.0, PEER_TIMEOUT / 4)
STALL_SLACK = 2.5  # a loaded 2-core machine's scheduling, on top of the timeout
RECOVERY_TIMEOUT = 90.0
JOB = "web"


@dataclass(frozen=True)
class RunSpec:
    seed: int
    nodes: int = 2
    mode: str = "sync"
    faults: int = 6
    kinds: list[str] | None = None
    size: int = 16 * MiB
    blocks: int = 1024  # the writer's first blocks (4 MiB): a full resync stands out


@dataclass
class FaultRecord:
    fault: str
    kind: str
    recovery_s: float | None = None
    resync_bytes: int = 0
    full_resync: bool = False
    longest_wait_s: float = 0.0
    failed_requests: int = 0
    repairs: list[str] = field(default_factory=list)  # what the administrator had to do


@dataclass
class RunReport:
    spec: RunSpec
    schedule: list[Fault]
    records: list[FaultRecord] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    writes: int = 0
    flushes: int = 0
    looks: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"seed {self.spec.seed}: {self.spec.nodes} nodes, {self.spec.mode}, "
            f"{len(self.records)}/{len(self.schedule)} faults, {self.writes} writes and "
            f"{self.flushes} flushes acknowledged, {self.looks} looks, {self.seconds:.0f} s",
            f"schedule: {describe(self.schedule)}",
            *(f"  {r.fault}: recovered in {r.recovery_s}s, resynced {r.resync_bytes} B, "
              f"longest wait {r.longest_wait_s:.2f}s, {r.failed_requests} failed requests"
              + (f", repaired: {'; '.join(r.repairs)}" if r.repairs else "")
              for r in self.records),
            *(f"ANOMALY {a}" for a in self.anomalies),
        ]  # fmt: skip
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"anomalies": [str(a) for a in self.anomalies]}


def run(spec: RunSpec, directory: Path) -> RunReport:
    started = time.monotonic()
    faults = schedule(spec.seed, spec.faults, spec.nodes - 1, spec.kinds)
    report = RunReport(spec, faults)
    names = NAMES[: spec.nodes]
    settings = {"peer_timeout": PEER_TIMEOUT}
    with FaultCluster(directory, names, spec.size, settings) as cluster:
        workload = None
        try:
            nemesis = Nemesis(cluster, names, JOB, spec.mode, spec.seed)
            nemesis.create_job()
            nemesis.wait_mirroring(RECOVERY_TIMEOUT)  # the initial full resync, unhurried
            uris = [cluster.nodes[name].uri for name in names]
            workload = Workload(directory, uris, spec.blocks, spec.seed)
            checker = Checker(cluster, workload.history, JOB, spec.mode)
            checker.source = names[0]
            if _converge(checker, workload, time.monotonic()) is None:
                raise RuntimeError(f"the job never reached Mirroring: {nemesis.describe_state()}")
            checker.identical(f"seed {spec.seed}, after the initial full resync")
            workload.resume()
            for fault in faults:
                record = _one_fault(fault, nemesis, checker, workload, spec)
                report.records.append(record)
                if record.recovery_s is None:
                    break
        finally:
            if workload is not None:
                workload.stop()
                report.writes = workload.history.acked_writes
                report.flushes = workload.history.acked_flushes
            report.anomalies = checker.anomalies if workload is not None else []
            report.looks = checker.looks if workload is not None else 0
    report.seconds = time.monotonic() - started
    return report


def _one_fault(
    fault: Fault, nemesis: Nemesis, checker: Checker, workload: Workload, spec: RunSpec
) -> FaultRecord:
    record = FaultRecord(str(fault), fault.kind)
    context = f"seed {spec.seed}, {fault}"
    resynced = nemesis.resync_counters()
    marks = nemesis.log_marks()
    began = time.monotonic()
    nemesis.strike(fault, workload, checker)
    time.sleep(fault.duration)
    if workload.pause(timeout=2.0):
        checker.look(f"{context} (during)")
        workload.resume()
    nemesis.heal(fault, workload, checker)
    healed = time.monotonic()
    converged = _converge(checker, workload, healed, nemesis, record, context)
    if converged is None:
        checker.anomalies.append(Anomaly("no recovery", context, nemesis.describe_state()))
        return record
    record.recovery_s = round(converged - healed, 2)
    checker.look(f"{context} (after)")
    checker.identical(f"{context} (after)")
    workload.resume()
    record.resync_bytes = nemesis.resynced_since(resynced)
    log = nemesis.log_since(marks)
    record.full_resync = "full resync" in log or "all marked" in log
    if record.full_resync and "state='Broken'" not in log and "state='Split brain'" not in log:
        checker.anomalies.append(
            Anomaly("full resync", context, f"{record.resync_bytes} B resynced, no Broken state")
        )
    _application_view(record, fault, workload, began, converged, context, checker)
    return record


def _converge(
    checker: Checker, workload: Workload, since: float,
    nemesis: Nemesis | None = None, record: FaultRecord | None = None, context: str = "",
) -> float | None:  # fmt: skip
    """Wait until everything settled (the time it first did: the recovery), then pause the
    writer and wait until nothing is out of sync or on its way.  A Broken or split mirror is
    repaired as an administrator would (``Nemesis.repair``)."""
    deadline, first = since + RECOVERY_TIMEOUT, None
    while time.monotonic() < deadline:
        if nemesis is not None and record is not None:
            record.repairs += nemesis.repair(checker, context)
        if checker.settled():
            first = first or time.monotonic()
            if workload.pause(timeout=5.0) and checker.converged():
                return first
        elif not workload.paused:
            first = None  # it settled, then went on changing: not recovered yet
        time.sleep(0.1)
    return None


def _application_view(
    record: FaultRecord, fault: Fault, workload: Workload,
    began: float, ended: float, context: str, checker: Checker,
) -> None:  # fmt: skip
    history = workload.history
    waits = [  # every request the fault may have held up: answered after it began
        answered - sent
        for sent, answered, _ in history.intervals
        if answered >= began and sent <= ended
    ]
    record.longest_wait_s = round(max(waits, default=0.0), 3)
    failed = [errno for at, errno in history.failures if began <= at <= ended]
    record.failed_requests = len(failed)
    if fault.kind not in TARGET_SIDE:
        return
    if failed:
        checker.anomalies.append(
            Anomaly("write failed because of a target", context, f"errnos {failed[:5]}")
        )
    bound = PEER_TIMEOUT + PING_INTERVAL + STALL_SLACK
    if record.longest_wait_s > bound:
        checker.anomalies.append(
            Anomaly("write stalled", context, f"{record.longest_wait_s:.2f} s > {bound:.2f} s")
        )
