"""A source whose own disk fails: the copies may differ, and the mirror must say so and repair it.

Both bugs here were found by the nemesis (tests/fault), which these tests replay alone.

* **Bad sectors under the source volume** (powerloss_fs ``fail EIO write only=data1.img``):
  a write is shipped to the target while the local disk writes it, so the target can take a
  write the source's disk refused.  Before the fix the mirror stayed Mirroring with nothing
  out of sync while megabytes differed.  Now every failed write's regions stay marked: the
  mirror goes Resyncing (cause "source disk failed a write"), ``out_of_sync_bytes`` covers
  the difference, and the resync puts the source's data back on the target (reads of the
  failing disk still work, so it may be over before the test looks).
* **The whole source disk failing**, intent log and job records included (``fail EIO
  write``): the mirror breaks (changes can no longer be tracked).  Before the fix the job
  record's save raised inside the state change, which left the link to the target open and
  the mirror stuck in Resync pending after the administrator's full resync; now the change
  completes, the failed save is logged, and ``mirror resync --full`` repairs the mirror.

Each test ends with byte-identical volumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.integration.rawnbd import RawNbd
from tests.support.mirroring import (
    cli,
    data1,
    mirror_view,
    post_job,
    stop_both_and_compare,
    wait_state,
)
from tests.support.watch import EventWatch
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20
fuse_only = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def source_on_disk(
    start_node: NodeFactory, disk: PowerLossDisk, tmp_path: Path
) -> tuple[LocalNode, LocalNode]:
    """beta on a plain file; alpha with its volume and state_dir on the failing disk."""
    beta = start_node("beta", [VolumeSpec("data1", "16MiB")])
    (disk.mountpoint / "state").mkdir()
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "state").symlink_to(disk.mountpoint / "state")
    volume = VolumeSpec("data1", "16MiB", path=disk.mountpoint / "data1.img")
    alpha = start_node("alpha", [volume], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring", timeout=60)
    return alpha, beta


def write_blocks(alpha: LocalNode, count: int, seed: int) -> int:
    """Write ``count`` random 4 KiB blocks in the first 4 MiB; the number that failed."""
    failed, data = 0, os.urandom(4096)
    with RawNbd.open(alpha.nbd_socket, "data1") as client:
        for n in range(count):
            offset = (seed * 7919 + n * 104729) % 1024 * 4096
            failed += client.write(offset, data).error != 0
    return failed


def differing_blocks(alpha: LocalNode, beta: LocalNode) -> int:
    a, b = data1(alpha).read_bytes(), data1(beta).read_bytes()
    return sum(a[i : i + 4096] != b[i : i + 4096] for i in range(0, len(a), 4096))


@fuse_only
def test_writes_the_source_disk_refused_are_marked_and_resynced(
    failing_disk: PowerLossDisk, start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = source_on_disk(start_node, failing_disk, tmp_path)
    events = EventWatch(alpha, tmp_path / "events.jsonl")
    try:
        failing_disk.command("fail EIO write only=data1.img")
        assert write_blocks(alpha, 200, seed=1) == 200  # the client is told
        view = mirror_view(alpha)
        if view["state"] != "Mirroring":  # the resync may be over already (reads still work)
            assert view["out_of_sync_bytes"] >= differing_blocks(alpha, beta) * 4096, view
        failing_disk.command("heal")
        wait_state(alpha, "Mirroring", timeout=30)
        deadline = time.monotonic() + 10
        while not (marked := [e for e in events.of_mirror("web", "beta:data1")
                              if e.get("cause") == "source disk failed a write"]):  # fmt: skip
            assert time.monotonic() < deadline, events.events()
            time.sleep(0.05)
        assert marked[0]["was"] == "Mirroring" and marked[0]["state"] == "Resyncing", marked
    finally:
        events.stop()
    assert differing_blocks(alpha, beta) == 0
    assert write_blocks(alpha, 50, seed=2) == 0
    stop_both_and_compare(alpha, beta)


@fuse_only
def test_a_source_disk_failing_altogether_breaks_the_mirror_and_a_full_resync_repairs_it(
    failing_disk: PowerLossDisk, start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = source_on_disk(start_node, failing_disk, tmp_path)
    failing_disk.command("fail EIO write")
    write_blocks(alpha, 100, seed=3)
    wait_state(alpha, "Broken", timeout=10)
    assert "job record not saved" in alpha.log_text()
    failing_disk.command("heal")
    control = f"unix:{alpha.control_socket}"
    done = cli("mirror", "resync", "web", "--full", "--node", control)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while mirror_view(alpha)["state"] != "Mirroring":
        assert time.monotonic() < deadline, mirror_view(alpha)
        time.sleep(0.05)
    assert write_blocks(alpha, 50, seed=4) == 0
    stop_both_and_compare(alpha, beta)
