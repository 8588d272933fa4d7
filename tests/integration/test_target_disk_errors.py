"""A target whose disk fails is never counted as in sync (real daemons, real failing disks).

Two kinds of failing disk hold the target volume ``beta:data1``:

* a small **tmpfs** (``mount -t tmpfs -o size=...``): a full resync of a volume larger than
  the filesystem runs out of space (ENOSPC) part way, as a filesystem filling up does; the
  administrator's fix is a remount with more room;
* the **failing FUSE disk** of tests/integration/powerloss_fs.py, told ``fail EIO write`` (or
  ``fail ENOSPC write``, ``fail EIO fsync``) and later ``heal``: every write, or every flush, of
  the volume file fails with that errno until then.

Each test drives the source's NBD export while the target fails (full resync, partial resync,
sync and async mirroring, compressed and plain frames, WRITE_ZEROES and TRIM, FLUSH) and
proves what the issue asks:

* the source's client saw no error (every NBD reply OK);
* the failure is published on the source's event stream (a mirror ``change`` event with an
  ``error`` field);
* while the target fails, the mirror never reports Mirroring: a state watcher polls the
  source's status throughout, ``out_of_sync_bytes`` covers the real difference of the two
  volume files, and ``last_error`` gives the target's reason; the target's own status shows
  the volume's last error and data state Inconsistent; the error is counted in
  ``volkeeper_mirror_target_errors_total``;
* once the disk is back the mirror reaches Mirroring by itself (reconnection after a backoff)
  and, with both daemons stopped, the two volumes are byte-identical.

Each of these tests failed before the fix (a resync chunk's error ACK was not looked at: the
full resync "finished", cleared its bitmap and reported Mirroring over holes).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.integration.rawnbd import (
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    OK,
    RawNbd,
)
from tests.support.mirroring import (
    StateLog,
    cli,
    data1,
    mirror_view,
    sha256,
    volume_view,
    wait_state,
)
from tests.support.watch import EventWatch
from volkeeper_lab.launcher import LocalNode, VolumeSpec

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
BLOCK = 4 * KiB
RECOVERY = 60.0  # seconds: the longest backoff is 10 s, then a resync of a few MiB

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
fuse_only = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent: no FUSE in this environment"
)


# -- disks -----------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 20 MiB: too small for a 32 MiB volume (``grow_tmpfs`` makes room)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=20m", "volkeeper-test", str(where)]
    subprocess.run(mount, check=True, capture_output=True, timeout=10)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=10)


def grow_tmpfs(where: Path) -> None:
    remount = ["mount", "-o", "remount,size=64m", str(where)]
    subprocess.run(remount, check=True, capture_output=True, timeout=10)


# -- nodes and checks --------------------------------------------------------------------------


def nodes(start_node: NodeFactory, target_path: Path, tmp_path: Path) -> tuple[LocalNode, ...]:
    """beta keeps data1 at ``target_path``; alpha's data1 starts with SIZE random bytes."""
    source = tmp_path / "alpha-data1.img"
    source.write_bytes(random.Random(7).randbytes(SIZE))
    beta = start_node("beta", [VolumeSpec("data1", SIZE, path=target_path)])
    alpha = start_node(
        "alpha", [VolumeSpec("data1", SIZE, path=source)], peers={"beta": beta.peer_port}
    )
    return alpha, beta


def create_job(alpha: LocalNode, mode: str = "sync", compression: str = "none") -> None:
    body = {
        "name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": mode,
        "compression": compression, "confirm": True,
    }  # fmt: skip
    with alpha.api() as api:
        response = api.post("/jobs", json=body)
    assert response.status_code == 201, response.text


def wait_error(node: LocalNode, words: str, timeout: float = 30.0) -> dict[str, Any]:
    """The source's mirror view once its ``last_error`` names the target's failure."""
    deadline = time.monotonic() + timeout
    while True:
        view = mirror_view(node)
        if words in (view["last_error"] or ""):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"no {words!r} in last_error after {timeout}s: {view}")
        time.sleep(0.05)


def differing_bytes(a: Path, b: Path) -> int:
    differ = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while (x := fa.read(MiB)) or fb.peek(1):
            y = fb.read(len(x) or MiB)
            differ += sum(
                BLOCK for at in range(0, max(len(x), len(y)), BLOCK)
                if x[at : at + BLOCK] != y[at : at + BLOCK]
            )  # fmt: skip
    return differ


def target_errors(node: LocalNode) -> float:
    with node.api() as api:
        text = api.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("volkeeper_mirror_target_")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if "_total{" in line)


def assert_failure_shown(alpha: LocalNode, beta: LocalNode, reason: str) -> None:
    """While the target fails: honest on both nodes."""
    view = wait_error(alpha, reason)
    assert view["state"] in ("Resync pending", "Resyncing"), view
    assert view["last_error"].startswith("target beta: data1: "), view
    assert target_errors(alpha) >= 1
    volume = volume_view(beta)
    assert volume["last_error"] and reason in volume["last_error"].lower(), volume
    (mirror,) = [m for m in beta.status()["mirrors"] if m["job"] == "web"]  # type: ignore[attr-defined]
    assert mirror["data_state"] == "Inconsistent", mirror


def assert_marked(alpha: LocalNode, beta: LocalNode) -> None:
    """Writes have stopped and the target still fails: every difference is tracked."""
    time.sleep(0.5)  # in-flight frames answered
    view = mirror_view(alpha)
    differ = differing_bytes(data1(alpha), data1(beta))
    assert differ > 0, "the failing disk should have left the volumes different"
    assert view["state"] != "Mirroring", view
    assert view["out_of_sync_bytes"] >= differ, (view, differ)


def recover_and_compare(alpha: LocalNode, beta: LocalNode, watcher: StateLog) -> None:
    wait_state(alpha, "Mirroring", timeout=RECOVERY)
    view = mirror_view(alpha)
    assert view["out_of_sync_bytes"] == 0 and view["last_error"] is None, view
    assert volume_view(beta)["last_error"] is None
    watcher.finish()
    codes = {"alpha": alpha.stop(), "beta": beta.stop()}
    assert codes == {"alpha": 0, "beta": 0}
    assert sha256(data1(alpha)) == sha256(data1(beta))


class Writer:
    """One NBD connection to the source; every reply must be OK."""

    def __init__(self, node: LocalNode, seed: int) -> None:
        self.client = RawNbd.open(node.nbd_socket, "data1", timeout=30)
        self.rng = random.Random(seed)

    def writes(self, count: int, size: int = 64 * KiB, compressible: bool = False) -> None:
        for _ in range(count):
            offset = self.rng.randrange(0, SIZE - size, BLOCK)
            data = self.rng.randbytes(size // 4) * 4 if compressible else self.rng.randbytes(size)
            reply = self.client.write(offset, data)
            assert reply.error == OK, f"the source's client saw error {reply.error}"

    def zero_and_trim(self) -> None:
        for cmd in (CMD_WRITE_ZEROES, CMD_TRIM):
            offset = self.rng.randrange(0, SIZE - MiB, BLOCK)
            reply = self.client.request(cmd, offset=offset, length=256 * KiB)
            assert reply.error == OK, f"the source's client saw error {reply.error}"

    def flush(self) -> None:
        assert self.client.flush().error == OK

    def close(self) -> None:
        self.client.close()


def watch(alpha: LocalNode) -> StateLog:
    watcher = StateLog(alpha)
    watcher.start()
    return watcher


def mirroring_after(watcher: StateLog, since: int) -> bool:
    return "Mirroring" in watcher.states[since:]


# -- tests -------------------------------------------------------------------------------------


@root_only
def test_a_full_disk_during_the_full_resync_is_never_mirroring(
    tmpfs: Path, start_node: NodeFactory, tmp_path: Path
) -> None:
    """The issue's case: the target's filesystem fills up during job creation's resync."""
    alpha, beta = nodes(start_node, tmpfs / "data1.img", tmp_path)
    watcher = watch(alpha)
    create_job(alpha)
    assert_failure_shown(alpha, beta, "no space left on device")
    writer = Writer(alpha, 1)
    writer.writes(32)
    writer.flush()
    writer.close()
    assert_marked(alpha, beta)
    assert "Mirroring" not in watcher.states, watcher.states
    grow_tmpfs(tmpfs)  # the administrator makes room; nothing is restarted
    recover_and_compare(alpha, beta, watcher)


@fuse_only
@pytest.mark.parametrize(
    ("mode", "compression", "fault", "reason"),
    [
        ("sync", "none", "fail EIO write", "input/output error"),
        ("async", "zstd:1", "fail ENOSPC write", "no space left on device"),
        ("sync", "lz4", "fail EIO fsync", "input/output error"),
    ],
    ids=["sync-eio-write", "async-zstd-enospc", "sync-lz4-flush-eio"],
)
def test_a_disk_failing_while_mirroring_is_tracked_and_repaired(
    failing_disk: PowerLossDisk,
    start_node: NodeFactory,
    tmp_path: Path,
    mode: str,
    compression: str,
    fault: str,
    reason: str,
) -> None:
    alpha, beta = nodes(start_node, failing_disk.mountpoint / "data1.img", tmp_path)
    create_job(alpha, mode, compression)
    wait_state(alpha, "Mirroring", timeout=60)
    watcher = watch(alpha)
    failing_disk.command(fault)
    writer = Writer(alpha, 2)
    writer.writes(16, compressible=compression != "none")
    writer.zero_and_trim()
    writer.flush()  # the flush-failing disk fails here
    assert_failure_shown(alpha, beta, reason)
    start = len(watcher.states)
    writer.writes(16, compressible=compression != "none")
    writer.zero_and_trim()
    writer.flush()
    writer.close()
    assert_marked(alpha, beta)
    assert not mirroring_after(watcher, start), watcher.states
    failing_disk.command("heal")
    recover_and_compare(alpha, beta, watcher)


@fuse_only
def test_a_disk_failing_during_a_partial_resync_clears_nothing_it_did_not_write(
    failing_disk: PowerLossDisk, start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = nodes(start_node, failing_disk.mountpoint / "data1.img", tmp_path)
    create_job(alpha, compression="zlib:1")
    wait_state(alpha, "Mirroring", timeout=60)
    assert cli("mirror", "pause", "web", "--node", f"unix:{alpha.control_socket}").returncode == 0
    writer = Writer(alpha, 3)
    writer.writes(64, compressible=True)  # 4 MiB marked while paused
    writer.flush()
    marked = mirror_view(alpha)["out_of_sync_bytes"]
    assert marked >= 2 * MiB
    failing_disk.command("fail EIO write")
    watcher = watch(alpha)
    events = EventWatch(alpha, tmp_path / "events.jsonl")
    try:
        resumed = cli("mirror", "continue", "web", "--node", f"unix:{alpha.control_socket}")
        assert resumed.returncode == 0, resumed.stderr
        assert_failure_shown(alpha, beta, "input/output error")
        deadline = time.monotonic() + 10
        while not (errors := [e for e in events.of_mirror("web", "beta:data1") if "error" in e]):
            assert time.monotonic() < deadline, events.events()
            time.sleep(0.05)
        assert "input/output error" in errors[0]["error"], errors
    finally:
        events.stop()
    writer.writes(8, compressible=True)
    writer.close()
    assert_marked(alpha, beta)
    assert mirror_view(alpha)["out_of_sync_bytes"] >= marked
    assert "Mirroring" not in watcher.states, watcher.states
    failing_disk.command("heal")
    recover_and_compare(alpha, beta, watcher)


@pytest.mark.serial  # bounds a recovery time
@fuse_only
def test_mirror_resync_retries_at_once_after_the_disk_is_fixed(
    failing_disk: PowerLossDisk, start_node: NodeFactory, tmp_path: Path
) -> None:
    """After the fourth failed attempt the next one is 10 s away (TARGET_ERROR_BACKOFF);
    ``mirror resync`` does not wait for it."""
    alpha, beta = nodes(start_node, failing_disk.mountpoint / "data1.img", tmp_path)
    failing_disk.command("fail EIO write")
    watcher = watch(alpha)
    create_job(alpha)
    assert_failure_shown(alpha, beta, "input/output error")
    deadline = time.monotonic() + 30
    while mirror_view(alpha)["target_errors"] < 4:  # attempts 1 s, 2 s and 5 s apart
        assert time.monotonic() < deadline, mirror_view(alpha)
        time.sleep(0.05)
    failing_disk.command("heal")
    started = time.monotonic()
    done = cli("mirror", "resync", "web", "--node", f"unix:{alpha.control_socket}")
    assert done.returncode == 0, done.stderr
    wait_state(alpha, "Mirroring", timeout=RECOVERY)
    assert time.monotonic() - started < 7, "mirror resync should not wait for the backoff"
    assert "Mirroring" not in watcher.states[:-1], watcher.states
    recover_and_compare(alpha, beta, watcher)
