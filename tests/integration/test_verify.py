"""Checksum resync and online verify, with two real daemons, real NBD clients and real files.

Every test starts ``beta`` (the target) and ``alpha`` (the source, beta in its ``[peers]``) with
the ``start_node`` fixture and creates job ``web`` (alpha:data1 -> beta:data1, sync mode, 4 KiB
regions).  Differences are *planted*: bytes written straight into beta's backing file, behind
the daemons' back, at region-aligned offsets -- so the regions that differ, and their bytes,
are known exactly.  A checksum resync must send exactly those regions (not the volume); a
verify must report exactly them (no false differences from application writes racing it), and
with ``--mark`` have them resynced.  Loads are fio randwrite with crc32c verify through alpha's
NBD export.  Data is always checked on disk after the daemons stopped (source first): the
backing files must be byte-identical.

Byte counts come from the source's mirror view: ``sent_bytes`` (payload before compression)
and ``wire_bytes`` (payload on the wire; no compression here, so the same) grow by what a
resync ships; HASH_REQUEST / HASHES frames carry no payload and count for neither.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    VERIFY,
    MiB,
    cli,
    data1,
    fio_result,
    mirror_view,
    ok,
    pair,
    post_job,
    random_file,
    sha256,
    start_fio,
    stop_both_and_compare,
    stop_process,
    volume_view,
    wait_state,
)
from tests.support.topologies import Events, Load
from volkeeper_lab.launcher import LocalNode

KiB = 1 << 10
REGION = 4 * KiB  # the default region size (core/bitmap.py MIN_REGION_SIZE)
SIZE = "64MiB"
VOLUME_BYTES = 64 * MiB

# Test 1's divergence: five scattered 4 KiB regions (the first and the last of the volume among
# them) and one 64 KiB run that straddles a 1 MiB resync chunk boundary.
SCATTERED = [
    (0, REGION),
    (3001 * REGION, REGION),
    (9190 * REGION, REGION),
    (12345 * REGION, REGION),
    (VOLUME_BYTES - REGION, REGION),
    (32 * MiB - 32 * KiB, 64 * KiB),
]

# Test 2's plants, all in the upper half (the load writes the lower half): a single region, two
# regions straddling a 4 MiB verify chunk boundary, and the volume's last region.
PLANTS = [
    (33 * MiB + 5 * REGION, REGION),
    (48 * MiB - REGION, 2 * REGION),
    (VOLUME_BYTES - REGION, REGION),
]

# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def background() -> Iterator[list[Load | Events | subprocess.Popen[bytes]]]:
    """Loads, fio runs and event watchers of a test, stopped by PID before the nodes are."""
    started: list[Load | Events | subprocess.Popen[bytes]] = []
    yield started
    for item in reversed(started):
        if isinstance(item, Load):
            item.abort()
        elif isinstance(item, Events):
            item.stop()
        else:
            stop_process(item, grace=2)


def vk(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, "--node", f"unix:{node.control_socket}")


def plant(file: Path, regions: list[tuple[int, int]]) -> int:
    """Overwrite ``regions`` of a backing file with bytes that differ; returns the byte count."""
    with file.open("r+b") as f:
        for offset, length in regions:
            f.seek(offset)
            old = f.read(length)
            new = os.urandom(length)
            while any(new[i : i + REGION] == old[i : i + REGION] for i in range(0, length, REGION)):
                new = os.urandom(length)
            f.seek(offset)
            f.write(new)
        f.flush()
        os.fsync(f.fileno())
    return len(region_offsets(regions)) * REGION


def region_offsets(regions: list[tuple[int, int]]) -> list[int]:
    """The distinct regions ``regions`` cover, by offset."""
    return sorted({o for offset, length in regions for o in range(offset, offset + length, REGION)})


def seeded_pair(start_node: NodeFactory, tmp_path: Path) -> tuple[LocalNode, LocalNode]:
    """Random data over the whole of alpha:data1 (through NBD), then job web, Mirroring."""
    need("nbdcopy", "fio")
    alpha, beta = pair(start_node, SIZE)
    ok("nbdcopy", str(random_file(tmp_path / "seed.bin", VOLUME_BYTES)), alpha.uri())
    (tmp_path / "seed.bin").unlink()
    created = post_job(alpha)
    assert created.status_code == 201, created.text
    wait_state(alpha, "Mirroring", timeout=60)
    return alpha, beta


def diverged_restart(alpha: LocalNode, beta: LocalNode, regions: list[tuple[int, int]]) -> int:
    """Stop both (source first), plant ``regions`` on beta, start both: Mirroring, unmarked."""
    assert [alpha.stop(), beta.stop()] == [0, 0]
    assert sha256(data1(alpha)) == sha256(data1(beta))
    planted = plant(data1(beta), regions)
    assert sha256(data1(alpha)) != sha256(data1(beta))
    beta.start()
    alpha.start()
    view = wait_state(alpha, "Mirroring", timeout=30)
    assert view["out_of_sync_bytes"] == 0, view
    assert view["sent_bytes"] <= 256 * KiB, f"the restart resent {view['sent_bytes']} bytes"
    assert view["verify"] is None and view["checksum_resync"] is False, view
    return planted


def wait_resynced(node: LocalNode, timeout: float = 60.0) -> dict[str, Any]:
    """Mirroring again, nothing marked, no checksum resync pending."""
    deadline = time.monotonic() + timeout
    while True:
        view = mirror_view(node)
        done = view["state"] == "Mirroring" and not view["checksum_resync"]
        if done and view["out_of_sync_bytes"] == 0:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(
                f"mirror web on {node.name} not back to Mirroring after {timeout}s: {view}\n"
                f"--- {node.name} log (tail) ---\n{node.log_text()[-4000:]}"
            )
        time.sleep(0.05)


def wait_verified(node: LocalNode, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result: dict[str, Any] | None = mirror_view(node)["verify"]
        if result is not None and not result["running"]:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"verify still running after {timeout}s: {result}")
        time.sleep(0.05)


def changes(events: Events) -> list[tuple[str, str]]:
    """(state, cause) of every change of the mirror web -> beta:data1."""
    return [
        (e["state"], e.get("cause", ""))
        for e in events.live()
        if e["object"] == "mirror" and e["type"] == "change" and e.get("job") == "web"
        and e.get("target") == "beta:data1" and "state" in e
    ]  # fmt: skip


def changes_until_mirroring(events: Events, timeout: float = 10.0) -> list[tuple[str, str]]:
    """``changes`` once the last one is Mirroring: the view can say so a moment before the
    event stream's subprocess has written the event to its file."""
    deadline = time.monotonic() + timeout
    while not (found := changes(events)) or found[-1][0] != "Mirroring":
        assert time.monotonic() < deadline, found
        time.sleep(0.02)
    return found


def log_lines(node: LocalNode, event: str) -> list[str]:
    return [line for line in node.log_text().splitlines() if event in line]


def resync_finished(node: LocalNode) -> dict[str, str]:
    """The fields of the last "resync finished" log line: bytes walked, checksum, sent_bytes
    (what that resync itself shipped: in checksum mode, only the regions that differed)."""
    lines = log_lines(node, "event='resync finished'")
    assert lines, f"no resync finished in {node.log_path}"
    return dict(re.findall(r"(\w+)='?([^' ]*)'?", lines[-1]))


def wait_writing(node: LocalNode, process: subprocess.Popen[bytes], cwd: Path) -> None:
    """Until the load's writes reach the mirror."""
    before, deadline = mirror_view(node)["sent_bytes"], time.monotonic() + 10
    while mirror_view(node)["sent_bytes"] - before < 256 * KiB:
        assert time.monotonic() < deadline, "fio's writes never reached the mirror"
        assert process.poll() is None, (cwd / "fio.stderr").read_text()
        time.sleep(0.02)


class LightLoad(Load):
    """fio randwrite with verify at one write in flight and 2 MB/s, over part of the volume."""

    def __init__(self, uri: str, cwd: Path, offset: int, size: int) -> None:
        super().__init__(uri, cwd, offset, size)
        self.job = (
            "--rw=randwrite", "--bs=4k", "--iodepth=1", f"--offset={offset}", f"--size={size}",
            "--io_size=2m", "--rate=2m", *VERIFY,
        )  # fmt: skip


# -- 1. checksum resync ------------------------------------------------------------------------


def test_checksum_resync_sends_only_the_regions_that_differ(
    start_node: NodeFactory, tmp_path: Path, background: list[Any]
) -> None:
    alpha, beta = seeded_pair(start_node, tmp_path)
    diverged = diverged_restart(alpha, beta, SCATTERED)
    assert diverged == 5 * REGION + 64 * KiB

    before = mirror_view(alpha)
    events = Events(alpha, tmp_path / "events.jsonl")
    background.append(events)
    done = vk(alpha, "mirror", "resync", "web", "--checksum")
    assert done.returncode == 0, done.stderr
    after = wait_resynced(alpha)

    states = [state for state, _ in changes_until_mirroring(events)]
    assert "Resyncing" in states, states
    sent = after["sent_bytes"] - before["sent_bytes"]
    wire = after["wire_bytes"] - before["wire_bytes"]
    assert sent == diverged, f"diverged {diverged} bytes, the checksum resync sent {sent}"
    assert wire == diverged, f"diverged {diverged} bytes, {wire} went on the wire"
    finished = resync_finished(alpha)
    assert finished["checksum"] == "True", finished
    assert int(finished["bytes"]) == VOLUME_BYTES, finished  # every region was compared
    assert int(finished["sent_bytes"]) == diverged, finished
    stop_both_and_compare(alpha, beta)


def test_checksum_resync_under_fio_load_is_identical_and_sends_little(
    start_node: NodeFactory, tmp_path: Path, background: list[Any]
) -> None:
    alpha, beta = seeded_pair(start_node, tmp_path)
    diverged = diverged_restart(alpha, beta, SCATTERED)

    events = Events(alpha, tmp_path / "events.jsonl")
    background.append(events)
    fio_range = 32 * MiB
    process, output = start_fio(
        alpha.uri(), tmp_path,
        "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=64M", f"--io_size={fio_range}",
        "--rate_iops=1500", *VERIFY,
    )  # fmt: skip
    background.append(process)
    wait_writing(alpha, process, tmp_path)
    before, written_before = mirror_view(alpha), volume_view(alpha)["written_bytes"]
    done = vk(alpha, "mirror", "resync", "web", "--checksum")
    assert done.returncode == 0, done.stderr
    after = wait_resynced(alpha)
    written = volume_view(alpha)["written_bytes"] - written_before
    assert process.poll() is None, "fio ended before the resync did: the load did not overlap"
    assert process.wait(90) == 0, (tmp_path / "fio.stderr").read_text()
    result = fio_result(output)
    assert result["error"] == 0 and result["write"]["io_bytes"] == fio_range, result["write"]
    assert result["read"]["io_bytes"] == fio_range, "fio's verify pass did not read everything"

    states = [state for state, _ in changes_until_mirroring(events)]
    assert "Resyncing" in states, states
    sent = after["sent_bytes"] - before["sent_bytes"]
    wire = after["wire_bytes"] - before["wire_bytes"]
    finished = resync_finished(alpha)
    shipped = int(finished["sent_bytes"])
    compared = finished["bytes"]
    print(f"diverged {diverged}, load wrote {written} in the window, which sent {sent}; "
          f"the checksum resync compared {compared} and shipped {shipped}")  # fmt: skip
    assert finished["checksum"] == "True", finished
    assert int(finished["bytes"]) >= VOLUME_BYTES, finished
    assert shipped <= diverged + written, finished  # racing writes may add a few regions
    assert shipped < VOLUME_BYTES // 16, f"the checksum resync shipped {shipped} bytes"
    assert wire == sent, (sent, wire)
    assert sent <= diverged + written + 1 * MiB, (
        f"diverged {diverged}, the load wrote {written}, the checksum resync window sent {sent}"
    )
    assert sent < VOLUME_BYTES // 4, f"a checksum resync sent {sent} bytes of {VOLUME_BYTES}"
    wait_resynced(alpha)
    stop_both_and_compare(alpha, beta)


# -- 2. verify -----------------------------------------------------------------------------------


def test_verify_finds_planted_differences_then_marks_and_resyncs_them(
    start_node: NodeFactory, tmp_path: Path, background: list[Any]
) -> None:
    alpha, beta = seeded_pair(start_node, tmp_path)
    loaded = LightLoad(alpha.uri(), tmp_path / "load", 0, 32 * MiB)
    background.append(loaded)
    loaded.start()
    loaded.wait_running(1)  # one whole run (write + read back) done: the load is steady

    planted = plant(data1(beta), PLANTS)
    offsets = region_offsets(PLANTS)
    assert planted == 4 * REGION and len(offsets) == 4
    events = Events(alpha, tmp_path / "events.jsonl")
    background.append(events)

    # A plain verify: reports exactly the plants, marks nothing, changes no state.
    done = vk(alpha, "mirror", "verify", "web", "--wait")
    assert done.returncode == 1, f"verify of a diverged target exited {done.returncode}\n{done}"
    assert "beta:data1" in done.stdout and "differing 16.0 KiB" in done.stdout, done.stdout
    view = mirror_view(alpha)
    result = view["verify"]
    assert result is not None and not result["running"] and result["error"] is None, result
    assert result["mark"] is False, result
    assert result["differing_bytes"] == planted, result
    assert sorted(result["differing_offsets"]) == offsets, result
    assert result["done_bytes"] + result["unverified_bytes"] == VOLUME_BYTES, result
    assert result["unverified_bytes"] <= 32 * MiB, "verify gave up on regions the load never wrote"
    print(f"first verify: {result}")
    assert view["state"] == "Mirroring" and view["out_of_sync_bytes"] == 0, view
    assert changes(events) == [], "a verify without --mark changed the mirror's state"

    # With --mark: the same differences, marked and resynced.
    sent_before = mirror_view(alpha)["sent_bytes"]
    done = vk(alpha, "mirror", "verify", "web", "--mark", "--wait")
    assert done.returncode == 1, f"verify --mark exited {done.returncode}\n{done}"
    assert "marked for resync" in done.stdout, done.stdout
    after = wait_resynced(alpha)
    result = after["verify"]
    assert result["mark"] is True and result["differing_bytes"] == planted, result
    assert sorted(result["differing_offsets"]) == offsets, result
    deadline = time.monotonic() + 10
    while ("Mirroring", "resync finished") not in changes(events):
        assert time.monotonic() < deadline, changes(events)
        time.sleep(0.05)
    seen = changes(events)
    assert seen[0] == ("Resyncing", "verify marked differing regions"), seen
    assert seen[-1][0] == "Mirroring", seen
    finished = resync_finished(alpha)
    assert finished["checksum"] == "False", finished
    assert int(finished["bytes"]) == int(finished["sent_bytes"]) == planted, finished
    print(f"verify --mark: resync window sent {after['sent_bytes'] - sent_before} bytes")

    # A third verify finds nothing left.
    done = vk(alpha, "mirror", "verify", "web", "--wait")
    assert done.returncode == 0, f"verify after the resync exited {done.returncode}\n{done}"
    assert "differing 0 B" in done.stdout, done.stdout
    result = mirror_view(alpha)["verify"]
    assert result["differing_bytes"] == 0 and result["differing_offsets"] == [], result
    assert result["error"] is None, result
    assert mirror_view(alpha)["state"] == "Mirroring"

    assert loaded.finish() > 0
    stop_both_and_compare(alpha, beta)


# -- 3. refusals -------------------------------------------------------------------------------


def test_verify_and_checksum_resync_refusals_and_idempotent_verify(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = pair(start_node, SIZE)
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring", timeout=60)

    with alpha.api() as api:
        both = api.post("/jobs/web/mirror/resync", json={"full": True, "checksum": True})
        assert both.status_code == 400, both.text
        assert both.json()["error"]["code"] == "bad_request", both.json()
        misplaced = api.post("/jobs/web/mirror/pause", json={"checksum": True})
        assert misplaced.status_code == 400, misplaced.text
        misplaced = api.post("/jobs/web/mirror/resync", json={"mark": True})
        assert misplaced.status_code == 400, misplaced.text
    done = vk(alpha, "mirror", "resync", "web", "--full", "--checksum")
    assert done.returncode != 0 and "checksum" in done.stderr, done
    assert mirror_view(alpha)["state"] == "Mirroring" and not mirror_view(alpha)["checksum_resync"]

    # Twice while the first runs: the second answers with the running verify.  The target is
    # held (SIGSTOP, well under the 10 s peer timeout) so the first cannot finish meanwhile.
    assert beta.process is not None
    os.kill(beta.process.pid, signal.SIGSTOP)
    try:
        with alpha.api() as api:
            first = api.post("/jobs/web/mirror/verify", json={"target": "beta:data1"})
            second = api.post(
                "/jobs/web/mirror/verify", json={"target": "beta:data1", "mark": True}
            )
    finally:
        os.kill(beta.process.pid, signal.SIGCONT)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    one, two = first.json()["mirrors"][0]["verify"], second.json()["mirrors"][0]["verify"]
    assert one["running"] and two["running"], (one, two)
    assert (two["mark"], two["started"]) == (False, one["started"]), (one, two)
    result = wait_verified(alpha)
    assert result["error"] is None and result["differing_bytes"] == 0, result
    assert result["done_bytes"] == VOLUME_BYTES and result["unverified_bytes"] == 0, result
    assert len(log_lines(alpha, "verify finished")) == 1, log_lines(alpha, "verify finished")

    # Paused: no connected target to compare with.
    assert vk(alpha, "mirror", "pause", "web").returncode == 0
    wait_state(alpha, "Paused")
    with alpha.api() as api:
        refused = api.post("/jobs/web/mirror/verify", json={})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "conflict"
    assert "Paused" in refused.json()["error"]["message"], refused.json()
    done = vk(alpha, "mirror", "verify", "web", "--wait")
    assert done.returncode != 0 and "Paused" in done.stderr, done
    assert re.search(r"continue", refused.json()["error"]["hint"] or ""), refused.json()
    assert mirror_view(alpha)["state"] == "Paused"
    assert vk(alpha, "mirror", "continue", "web").returncode == 0
    wait_state(alpha, "Mirroring")
    stop_both_and_compare(alpha, beta)
