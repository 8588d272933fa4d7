"""A resync's rate with real daemons: it uses what the application leaves, and obeys resync_max.

What this proves, end to end (tests/daemon/source/test_sender.py proves the sender's lanes alone):

* under a throttle of 16 MiB/s, a full resync of 96 MiB of random data runs while fio writes
  12 MiB/s of incompressible data through NBD (fio starts just before the job is created, so
  the resync runs under the load from its start): over a window of several seconds the
  application keeps its 12 MiB/s (the volume's ``written_bytes``), the resync gets what is
  left (its ``done_bytes``: between 0.7 x resync_min, whose default is a tenth of the
  throttle, and 1.3 x (16 - 12 + 1.6) MiB/s), the wire carries no more than the throttle and
  the application's writes do not queue behind the resync's (the mirror's ``queue_bytes``);
  once the load stops the resync speeds up to near the throttle, finishes, the mirror is
  Mirroring and both copies are identical (a write the target lost shows here);
* ``mirror set --resync-max 4MiB`` during a resync with no application load brings the
  resync's rate on the wire down to 4 MiB/s (+-20 %).

Rates come from ``GET /status`` on the source, sampled every 0.25 s (the time of a sample is
the middle of its request); each is a difference of counters over the window, never the
view's own 5-second average.  Nodes come from the ``start_node`` fixture (stopped by PID at
teardown, exit 0 required); fio is stopped by PID too.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    MiB,
    fio_result,
    ok,
    pair,
    random_file,
    start_fio,
    stop_process,
)
from tests.support.topologies import (
    assert_identical,
    mirror,
    path,
    post,
    stop_in_order,
    vk_ok,
    wait_mirror,
)
from volkeeper_lab.launcher import LocalNode

pytestmark = pytest.mark.serial  # measures resync and application rates: runs alone

THROTTLE = 16 * MiB
RESYNC_MIN = THROTTLE // 10  # the default when only a throttle is set (daemon/source/mirror.py)
APP_RATE = 12 * MiB
LOAD_SECONDS = 8
EVERY = 0.25  # seconds between samples


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic(), the middle of the request
    written: int  # the source volume's written_bytes (through NBD)
    wire: int  # the mirror's wire_bytes (payload on the link: writes and resync)
    done: int  # the resync's done_bytes (0 once it is over)
    state: str
    queue: int  # the mirror's queue_bytes: application writes sent (or queued), not ACKed


def sample(api: Any) -> Sample:
    asked = time.monotonic()
    document = api.get("/status").json()
    answered = time.monotonic()
    (volume,) = [v for v in document["volumes"] if v["name"] == "data1"]
    (view,) = [m for m in document["mirrors"] if m["job"] == "web" and m["role"] == "source"]
    at = (asked + answered) / 2
    return Sample(at, volume["written_bytes"], view["wire_bytes"], view["resync"]["done_bytes"],
                  view["state"], view["queue_bytes"])  # fmt: skip


def window(
    samples: list[Sample], start: float, stop: float, least: float = 2.0
) -> tuple[Sample, Sample]:
    """The first and last samples inside [start, stop] while Resyncing (at least ``least`` s
    apart)."""
    inside = [s for s in samples if start <= s.at <= stop and s.state == "Resyncing"]
    assert len(inside) >= 2 and inside[-1].at - inside[0].at >= least, (
        f"too few samples in [{start:.2f}, {stop:.2f}]: {inside}"
    )
    return inside[0], inside[-1]


def per_second(first: Sample, last: Sample, counter: str) -> float:
    moved: int = getattr(last, counter) - getattr(first, counter)
    return moved / (last.at - first.at)


def mib(rate: float) -> str:
    return f"{rate / MiB:.2f} MiB/s"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Client processes a test started, stopped by PID before the nodes are."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop_process(process, grace=2)


def prefilled_pair(
    start_node: NodeFactory, tmp_path: Path, size: int
) -> tuple[LocalNode, LocalNode]:
    """alpha:data1 filled with random bytes through NBD (beta's copy is all zeros)."""
    need("nbdcopy")
    alpha, beta = pair(start_node, f"{size // MiB}MiB")
    noise = random_file(tmp_path / "noise.bin", size)
    ok("nbdcopy", str(noise), alpha.uri())
    noise.unlink()
    return alpha, beta


# -- 1. the resync gets what the application leaves --------------------------------------------


def test_resync_uses_what_the_application_leaves_then_speeds_up(
    start_node: NodeFactory, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    need("fio")
    size = 96 * MiB
    alpha, beta = prefilled_pair(start_node, tmp_path, size)
    baseline = alpha.status()["volumes"][0]["written_bytes"]  # type: ignore[index]

    # The load starts first, so the resync starts under it and has all of it to share.
    cwd = tmp_path / "load"
    cwd.mkdir()
    fio, output = start_fio(alpha.uri(), cwd, "--rw=randwrite", "--bs=256k", "--iodepth=4",
                            f"--size={size // MiB}m", f"--rate={APP_RATE // MiB}m",
                            "--time_based", f"--runtime={LOAD_SECONDS}",
                            "--refill_buffers")  # fmt: skip
    processes.append(fio)
    samples: list[Sample] = []
    with alpha.api() as api:
        deadline = time.monotonic() + 10
        while api.get("/volumes").json()[0]["written_bytes"] == baseline:
            assert fio.poll() is None, (cwd / "fio.stderr").read_text()
            assert time.monotonic() < deadline, "fio wrote nothing in 10 s"
            time.sleep(0.05)
        load_started = time.monotonic()
        created = api.post("/jobs", json={
            "name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "async",
            "queue_limit": "256MiB", "throttle": "16MiB", "confirm": True,
        })  # fmt: skip
        assert created.status_code == 201, created.text
        created_at = time.monotonic()

        load_ended: float | None = None
        while True:
            now = sample(api)
            samples.append(now)
            if load_ended is None and fio.poll() is not None:
                load_ended = time.monotonic()
            if now.state == "Mirroring":
                break
            assert now.at - created_at < 60, (
                f"no Mirroring 60 s after the job was created: {now}\n"
                f"--- alpha log (tail) ---\n{alpha.log_text()[-3000:]}"
            )
            time.sleep(max(0.0, now.at + EVERY - time.monotonic()))
    finished_at = samples[-1].at
    assert fio.wait(10) == 0, (cwd / "fio.stderr").read_text()
    assert load_ended is not None
    result = fio_result(output)
    assert result["error"] == 0, result
    fio_rate = result["write"]["bw_bytes"]

    # Under the load: from 1 s after the creation (the resync has started) to 0.5 s before
    # fio's runtime is over.
    first, last = window(samples, created_at + 1.0, load_started + LOAD_SECONDS - 0.5)
    app = per_second(first, last, "written")
    resync = per_second(first, last, "done")
    wire = per_second(first, last, "wire")
    # Once the load is over: 3 s of the resync alone (the queue of writes is gone in 0.5 s).
    alone_from = load_ended + 0.5
    assert finished_at >= alone_from + 3.0, (
        f"the resync finished {finished_at - load_ended:.1f} s after the load: no 3 s window "
        f"to measure it alone in"
    )
    a, b = window(samples, alone_from, alone_from + 3.0)
    alone = per_second(a, b, "done")
    # Application frames go first: they do not queue up behind the resync's.
    queues = sorted(s.queue for s in samples if first.at <= s.at <= last.at)
    queued = statistics.median(queues)
    report = (
        f"under load ({last.at - first.at:.1f} s): application {mib(app)} (fio's own average "
        f"{mib(fio_rate)}), resync {mib(resync)}, wire {mib(wire)}, queue median "
        f"{queued / MiB:.2f} MiB (max {queues[-1] / MiB:.2f}); resync alone {mib(alone)}; "
        f"Mirroring {finished_at - created_at:.1f} s after creation"
    )
    print(report)
    assert app >= 0.85 * APP_RATE, report
    assert 0.7 * RESYNC_MIN <= resync <= 1.3 * (THROTTLE - APP_RATE + RESYNC_MIN), report
    assert wire <= 1.05 * THROTTLE, report
    assert alone >= 12 * MiB, report
    # Measured: a median of 0.25-0.4 MiB (ACKs pending); a sender that let the resync go
    # first holds ~1.6 MiB of writes back.
    assert queued <= 1.0 * MiB, report

    view = wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    assert view["throttle"] == THROTTLE and view["out_of_sync_bytes"] == 0, view
    stop_in_order(alpha, beta)
    try:
        assert_identical(path(alpha), path(beta))
    except AssertionError as exc:
        raise AssertionError(
            f"the mirror said Mirroring with 0 bytes out of sync, yet the target differs: {exc}"
        ) from None


# -- 2. mirror set --resync-max during a resync -------------------------------------------------


def test_mirror_set_resync_max_slows_a_running_resync(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    size = 64 * MiB
    alpha, beta = prefilled_pair(start_node, tmp_path, size)
    created = post(alpha, {"name": "web", "source": "alpha:data1", "target": "beta:data1",
                           "mode": "async", "resync_max": "16MiB", "confirm": True})  # fmt: skip
    assert created.status_code == 201, created.text
    wait_mirror(alpha, "web", "beta:data1", "Resyncing")
    created_at = time.monotonic()

    samples: list[Sample] = []
    changed_at: float | None = None
    with alpha.api() as api:
        while True:
            now = sample(api)
            samples.append(now)
            assert now.state == "Resyncing", (
                f"the resync ended (or stopped) before it could be measured: {now}"
            )
            if changed_at is None and now.at - created_at >= 1.2:
                out = vk_ok(alpha, "mirror", "set", "web", "--resync-max", "4MiB")
                assert "job web" in out, out
                changed_at = time.monotonic()
            if changed_at is not None and now.at >= changed_at + 4.5:
                break
            time.sleep(max(0.0, now.at + EVERY - time.monotonic()))
    view = mirror(alpha, "web", "beta:data1")
    assert view["resync_max"] == 4 * MiB, view
    assert changed_at is not None
    first, last = window(samples, created_at + 0.2, created_at + 1.2, least=0.5)
    before = per_second(first, last, "wire")
    # From 1.5 s after the change (the ~4 MiB the sender had queued by then leave at the new
    # rate first): 3 s of the wire, which carries nothing but the resync here.
    a, b = window(samples, changed_at + 1.5, changed_at + 4.5)
    after = per_second(a, b, "wire")
    done_rate = per_second(a, b, "done")
    report = (
        f"resync_max 16 MiB/s: {mib(before)}; after mirror set 4 MiB: "
        f"wire {mib(after)} over {b.at - a.at:.1f} s (done_bytes, counted as 1 MiB chunks are "
        f"queued: {mib(done_rate)})"
    )
    print(report)
    assert before >= 8 * MiB, report  # the change is what slowed it down
    assert abs(after / (4 * MiB) - 1) <= 0.20, report

    # Lift the ceiling: the resync finishes, and the copies are identical.
    vk_ok(alpha, "mirror", "set", "web", "--resync-max", "none")
    view = wait_mirror(alpha, "web", "beta:data1", "Mirroring", timeout=60)
    assert view["resync_max"] is None, view
    stop_in_order(alpha, beta)
    assert_identical(path(alpha), path(beta))
