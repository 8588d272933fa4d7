"""Power loss: a disk that drops every unflushed write, then recovery proves invariant 2.

What this proves.  One node of a sync mirror (alpha:data1 -> beta:data1) keeps its volume file
and its ``state_dir`` (job and target records, the intent log in ``state_dir/bitmaps``) on a
``powerloss_fs`` mount: a FUSE filesystem, run as its own process, that holds every written
byte in memory until the file is fsync'ed (tests/integration/powerloss_fs.py; the first test
checks that disk itself).  A client writes 4 KiB..256 KiB blocks at random offsets through
alpha's NBD export, one request at a time, with an occasional FLUSH or FUA write, and records
which writes were acknowledged and which a completed FLUSH (or their own FUA) made durable.
Every 512-byte sector it writes is tagged with the write's number, so the test can tell which
write a sector on disk came from.  The writes fall in a 10 MiB window whose front sweeps
forward, so activity-log extents keep turning hot during the run (snapshot writes happen
under load, not only at the start).  At a random moment when acknowledged writes are not yet
flushed and no FLUSH is on its way, the power goes: ``kill -9`` of the node's daemon, then of
the FUSE process, which either persists nothing unflushed or, in the other run, a seeded
random half of its pending 4 KiB pieces (a disk whose cache was partly written).  What is left
in the backing directory is what the node's disk held.  (volkeeper may have flushed more than
the client asked for -- a FUA is a write plus fdatasync, a FLUSH may be half done -- so how
much was lost is printed, not asserted.)

Then, before the node restarts, the test reads that directory itself:

* every write made durable before the power went is on the crashed node's volume, each
  512-byte sector holding either it or a later write to that sector, never older or torn data;
* every 4 KiB region in which the two volumes differ is marked in the intent log that will be
  used to recover: the crashed source's log after crash recovery (run by ``IntentStore.open``
  on a copy: bitmap plus the activity log's extents; the header must say "not closed
  cleanly"), or, when the target crashed, the surviving source's durable bitmap.  An
  unmarked difference would survive every later resync: that is invariant 2 failing.

After a remount and a restart the mirror must come back to ``Mirroring`` by a partial resync
(bytes sent equal to the marked bytes, far below the volume size; the crashed target keeps its
lock and generation), and once both daemons have stopped and the disk is cleanly unmounted,
both backing files are byte-identical.  A crashed source keeps exactly its post-crash content
(acknowledged but unflushed writes may be lost there: NBD semantics), and the target has been
repaired to match; a crashed target ends up with every acknowledged write.

The daemon logs no line of its own for crash recovery, so the log is checked for what it
does say: after the restart, one partial resync of the marked bytes and no full resync.

A third scenario tears a bitmap page: the power goes while a page of the intent log is being
rewritten, and the disk keeps half of the new block.  The page fails its check when the node
starts, every region it covers is marked, and the partial resync of its range repairs the
target.

Each of the first two scenarios runs with two seeds, one per kind of power loss; the seed is
printed (and shown with a failure).  Each check was seen to fail against a deliberately broken
engine: activity-log snapshots not fdatasync'ed (source, kill -9), target-ACKed but undurable
writes forgotten on target loss, FLUSH acknowledged without fdatasync.  FUSE needs /dev/fuse:
without it the tests are skipped.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.integration.rawnbd import FLAG_FUA, OK, NbdClosed, NbdTimeout, RawNbd
from tests.support.mirroring import libnbd, sha256
from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.daemon.source import replication
from volkeeper.io.intent_store import IntentStore, read_durable_bitmap, read_header
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

KiB, MiB = 1 << 10, 1 << 20
SIZE = 128 * MiB
EXTENT = 4 * MiB  # the activity log's extent (core/activity_log.py DEFAULT_EXTENT_BYTES)
# A sequential writer's next extents are activated along with the one it needs, so a source
# crash may also resync these (daemon/source/replication.py).
LOOKAHEAD = getattr(replication, "LOOKAHEAD_EXTENTS", 0)
WINDOW = 10 * MiB  # the client writes in here (MiB-aligned: it spans 3 or 4 extents)
SWEEP = 32 * KiB  # how far the writes' front moves per write: cold extents keep coming
SECTOR = 512
REGION = 4096  # the intent log's region
ZERO_SECTOR = bytes(SECTOR)
TAG = struct.Struct(">4sIQ")  # every written sector starts: magic, write index, sector number
MAGIC = b"PLWR"

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent: no FUSE in this environment"
)

# -- the client and its model ------------------------------------------------------------------


@dataclass
class Write:
    index: int
    offset: int
    data: bytes
    fua: bool
    acked_at: float | None = None  # time.monotonic() of its OK reply
    error: int = 0

    def covers(self, sector: int) -> bool:
        return self.offset <= sector * SECTOR < self.offset + len(self.data)


class Load(threading.Thread):
    """One NBD connection, one request at a time, so issue order is acknowledgement order."""

    def __init__(self, address: Path, seed: int, window: int) -> None:
        super().__init__(daemon=True)
        self.address, self.seed = address, seed
        self.window = window  # first byte of the window the writes fall in
        self.writes: list[Write] = []
        self.flushes: list[tuple[int, float]] = []  # (writes issued before it, completed at)
        self.failures: list[str] = []
        self.ended_by: str | None = None
        self.flushing = False  # a FLUSH is on its way (it may hold already on some disks)
        self.halt = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            with RawNbd.open(self.address, "data1", timeout=30) as client:
                while not self.halt.is_set():
                    if self.writes and rng.random() < 0.1:
                        before = len(self.writes)
                        self.flushing = True
                        reply = client.flush()
                        self.flushing = False
                        if reply.error != OK:
                            self.failures.append(f"FLUSH after write {before}: {reply.error}")
                        else:
                            self.flushes.append((before, time.monotonic()))
                        continue
                    write = self._next(rng)
                    self.writes.append(write)
                    reply = client.write(write.offset, write.data, FLAG_FUA if write.fua else 0)
                    if reply.error != OK:
                        write.error = reply.error
                        self.failures.append(f"write {write.index}: error {reply.error}")
                    else:
                        write.acked_at = time.monotonic()
        except (NbdClosed, NbdTimeout, OSError) as exc:
            self.ended_by = repr(exc)

    def _next(self, rng: random.Random) -> Write:
        """A block inside the MiB after the front (which sweeps the window, so extents turn
        hot one after another during the run), or, one time in five, anywhere behind it."""
        index = len(self.writes)
        length = rng.randrange(4 * KiB // SECTOR, 256 * KiB // SECTOR + 1) * SECTOR
        front = min(index * SWEEP, WINDOW - MiB)
        low, high = (0, front + MiB) if rng.random() < 0.2 else (front, front + MiB)
        offset = self.window + rng.randrange(low, high - length + 1, SECTOR)
        data = bytearray(rng.randbytes(length))
        for at in range(0, length, SECTOR):
            TAG.pack_into(data, at, MAGIC, index, (offset + at) // SECTOR)
        return Write(index, offset, bytes(data), fua=rng.random() < 0.05)

    @property
    def unflushed(self) -> int:
        """Writes acknowledged after the newest completed FLUSH or FUA write (volkeeper does a
        FUA as write + fdatasync, which makes the writes before it durable too)."""
        start = self.flushes[-1][0] if self.flushes else 0
        for write in self.writes[start:]:
            if write.fua and write.acked_at is not None:
                start = write.index + 1
        return sum(1 for w in self.writes[start:] if w.acked_at is not None)

    @property
    def extents(self) -> set[int]:
        """The activity-log extents the writes touched."""
        return {
            extent
            for w in self.writes
            for extent in range(w.offset // EXTENT, (w.offset + len(w.data) - 1) // EXTENT + 1)
        }

    @property
    def acked(self) -> int:
        return sum(1 for w in self.writes if w.acked_at is not None)

    def durable_floor(self, before: float) -> list[int]:
        """Per sector of the window: the newest write a FLUSH (or its FUA) completed before
        ``before`` made durable, or -1."""
        covered = max((n for n, done in self.flushes if done < before), default=0)
        durable = [w for w in self.writes[:covered] if w.acked_at is not None]
        durable += [
            w for w in self.writes[covered:] if w.fua and w.acked_at and w.acked_at < before
        ]
        floor = [-1] * (WINDOW // SECTOR)
        for write in sorted(durable, key=lambda w: w.index):
            first = (write.offset - self.window) // SECTOR
            for s in range(first, first + len(write.data) // SECTOR):
                floor[s] = write.index
        return floor

    def newest(self) -> bytes:
        """The window as a disk that lost nothing would hold it."""
        image = bytearray(WINDOW)
        for write in self.writes:
            at = write.offset - self.window
            image[at : at + len(write.data)] = write.data
        return bytes(image)


def check_sectors(load: Load, volume: Path, floor: list[int], cut: float) -> tuple[list[str], int]:
    """Problems with the volume's content (empty: fine), and how many sectors hold something
    older than the newest write acknowledged before ``cut`` (acknowledged, unflushed, lost)."""
    problems: list[str] = []
    with volume.open("rb") as f:
        f.seek(load.window)
        image = f.read(WINDOW)
        f.seek(0)
        for start in range(0, SIZE, MiB):
            chunk = f.read(MiB)
            outside = not (load.window <= start < load.window + WINDOW)
            if outside and chunk.count(0) != len(chunk):
                problems.append(f"data outside the written window, in MiB {start // MiB}")
    newest_acked = [-1] * len(floor)
    for write in load.writes:
        if write.acked_at is not None and write.acked_at < cut:
            first = (write.offset - load.window) // SECTOR
            for s in range(first, first + len(write.data) // SECTOR):
                newest_acked[s] = write.index
    lost = 0
    for s, durable in enumerate(floor):
        sector = image[s * SECTOR : (s + 1) * SECTOR]
        absolute = load.window // SECTOR + s
        if sector == ZERO_SECTOR:
            found = -1
        else:
            magic, found, number = TAG.unpack_from(sector)
            if magic != MAGIC or number != absolute or found >= len(load.writes):
                problems.append(f"sector {absolute}: not written by the client (or torn)")
                continue
            write = load.writes[found]
            at = absolute * SECTOR - write.offset
            if not write.covers(absolute) or write.data[at : at + SECTOR] != sector:
                problems.append(f"sector {absolute}: torn or misplaced data of write {found}")
                continue
        if found < durable:
            what = "zeros" if found < 0 else f"write {found}"
            problems.append(f"sector {absolute}: {what}, but write {durable} was durable")
        lost += found < newest_acked[s]
    return problems[:20], lost


# -- intent logs and volumes, read straight from disk -------------------------------------------


def recovered_log(vkil: Path, scratch: Path) -> tuple[bool, IntentStore]:
    """(was the log left open, i.e. not closed cleanly; the log after crash recovery), the
    recovery run by volkeeper's own ``IntentStore.open`` on a copy."""
    header = read_header(vkil)
    copy = scratch / "recovered.vkil"
    shutil.copyfile(vkil, copy)
    store = IntentStore.open(
        copy, mirror=header.mirror, log_id=header.log_id,
        volume_size=header.geometry.volume_size,
    )  # fmt: skip
    assert store.damaged_pages == [], store.damage_report()
    return header.open, store


def durable_bitmap(vkil: Path) -> DirtyBitmap:
    """The bitmap as it is on disk (no crash recovery: the node that owns it is running)."""
    _, bitmap, damage = read_durable_bitmap(vkil)
    assert damage == []
    return bitmap


def differing_regions(a: Path, b: Path) -> list[int]:
    regions = []
    with a.open("rb") as fa, b.open("rb") as fb:
        for start in range(0, SIZE, MiB):
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                regions += [
                    (start + at) // REGION
                    for at in range(0, MiB, REGION)
                    if x[at : at + REGION] != y[at : at + REGION]
                ]
    return regions


# -- nodes --------------------------------------------------------------------------------------

DiskFactory = Callable[[str], PowerLossDisk]
PairFactory = Callable[[str], tuple[LocalNode, LocalNode, PowerLossDisk]]


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[DiskFactory]:
    """``disks(name)`` mounts a powerloss_fs; teardown kills and detaches what is left."""
    made: list[PowerLossDisk] = []

    def factory(name: str) -> PowerLossDisk:
        disk = PowerLossDisk(
            tmp_path / f"{name}-disk", tmp_path / f"{name}-mnt", tmp_path / f"{name}-fuse.log"
        )
        made.append(disk)
        disk.start()
        return disk

    yield factory
    for disk in made:
        disk.abandon()


@pytest.fixture
def pair(disks: DiskFactory, tmp_path: Path) -> Iterator[PairFactory]:
    """``pair("alpha" or "beta")``: nodes alpha (source) and beta (target), started together,
    the named one with its volume and state_dir on a powerloss_fs disk.  Only those are there:
    sockets, config and log stay in the node's own directory (LocalNode puts state_dir at
    DIR/state, made a symlink into the mount).  Teardown stops both by PID (exit status 0 on
    SIGTERM, as conftest's ``start_node`` wants), before the disk goes."""
    nodes: list[LocalNode] = []

    def factory(on_disk: str) -> tuple[LocalNode, LocalNode, PowerLossDisk]:
        disk = disks(on_disk)
        (disk.mountpoint / "state").mkdir()
        (tmp_path / on_disk).mkdir()
        (tmp_path / on_disk / "state").symlink_to(disk.mountpoint / "state")
        path = {on_disk: disk.mountpoint / "data1.img"}
        alpha_port = free_tcp_port()  # beta, the target, must know its source
        beta = LocalNode(
            tmp_path / "beta", "beta", [VolumeSpec("data1", SIZE, path=path.get("beta"))],
            peers={"alpha": alpha_port},
        )  # fmt: skip
        alpha = LocalNode(
            tmp_path / "alpha",
            "alpha",
            [VolumeSpec("data1", SIZE, path=path.get("alpha"))],
            peers={"beta": beta.peer_port},
            peer_port=alpha_port,
        )
        nodes.extend((alpha, beta))
        errors: list[BaseException] = []

        def start(node: LocalNode) -> None:
            try:
                node.start(timeout=60)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(node,)) for node in (alpha, beta)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return alpha, beta, disk

    yield factory
    codes = {node.name: node.stop() for node in nodes}
    assert all(code == 0 for code in codes.values()), f"daemon exit status on SIGTERM: {codes}"


def post_job(alpha: LocalNode) -> None:
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "sync"}
    with alpha.api() as api:
        response = api.post("/jobs", json={**body, "confirm": True})
    assert response.status_code == 201, response.text


def mirror_view(node: LocalNode) -> dict[str, Any]:
    mirrors: list[dict[str, Any]] = node.status()["mirrors"]  # type: ignore[assignment]
    (view,) = mirrors
    return view


def wait_state(node: LocalNode, state: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := mirror_view(node))["state"] != state:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"mirror on {node.name} not {state!r} after {timeout}s: {view}\n"
                f"--- {node.name} log (tail) ---\n{node.log_text()[-4000:]}"
            )
        time.sleep(0.05)
    return view


def run_load_then_cut(load: Load, rng: random.Random) -> float:
    """Let the client write (at least 2 completed FLUSHes), then a random while, until some
    acknowledged writes are not flushed yet; returns the moment just before the power goes."""
    load.start()
    deadline = time.monotonic() + 30
    while len(load.flushes) < 2 or load.acked < 20:
        assert load.is_alive(), f"the client stopped early: {load.ended_by} {load.failures}"
        assert time.monotonic() < deadline, "the client made no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.1, 0.8))
    while load.unflushed < 3 or load.flushing:
        assert time.monotonic() < deadline, "no unflushed writes to lose"
        time.sleep(0.001)
    assert load.is_alive(), f"the client stopped early: {load.ended_by} {load.failures}"
    return time.monotonic()


def check_log(source: LocalNode, since: int, resent: int) -> None:
    """The source's log, from ``since`` on, tells of one partial resync of ``resent`` bytes."""
    text = source.log_text()[since:]
    assert "full resync" not in text, text
    assert "state='Resyncing'" in text and "cause='connected, regions to resync'" in text, text
    finished = [line for line in text.splitlines() if "event='resync finished'" in line]
    assert finished and f" bytes={resent} " in finished[-1], text


CASES = [(20240611, "kill -9"), (77, "partial cache")]


def power_loss(disk: PowerLossDisk, seed: int, how: str) -> dict[str, Any]:
    return disk.power_loss(None if how == "kill -9" else seed, fraction=0.5)


# -- the disk itself ------------------------------------------------------------------------------


def fdatasync_until_the_power_goes(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fdatasync(fd)


def test_powerloss_fs_keeps_only_what_was_fsynced(disks: DiskFactory) -> None:
    """The fixture the other tests trust: unflushed data is gone after kill -9, a crash keeps
    a seeded part of it in whole 4 KiB pieces (or, torn, half of a page), a held flush keeps
    its writes pending, a clean shutdown keeps everything."""
    disk = disks("selftest")
    mounted, backing = disk.mountpoint / "f", disk.backing / "f"
    fd = os.open(mounted, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.pwrite(fd, b"A" * 8192, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"B" * 8192, 4096)
    assert os.pread(fd, 12288, 0) == b"A" * 4096 + b"B" * 8192, "reads miss pending writes"
    assert os.fstat(fd).st_size == 12288
    os.close(fd)  # close is no barrier
    os.rename(mounted, disk.mountpoint / "g")  # pending data follows the file
    assert disk.power_loss()["mode"] == "kill -9"
    assert not backing.exists() and (disk.backing / "g").read_bytes() == b"A" * 8192

    disk.start()
    fd = os.open(disk.mountpoint / "g", os.O_RDWR)
    os.pwrite(fd, b"C" * 65536, 0)
    os.close(fd)
    report = disk.power_loss(seed=5, fraction=0.5)
    assert report["pending_writes"] == 1 and report["pending_pieces"] == 16, report
    rng = random.Random(5)  # the choice powerloss_fs makes for seed 5, piece by piece
    chosen = [i for i in range(16) if rng.random() < 0.5]
    assert 0 < len(chosen) == report["applied_pieces"] < 16, report
    expected = bytearray(b"A" * 8192 + bytes(65536 - 8192))
    for i in chosen:
        expected[i * 4096 : (i + 1) * 4096] = b"C" * 4096
    end = max(8192, (chosen[-1] + 1) * 4096)
    assert (disk.backing / "g").read_bytes() == expected[:end]

    disk.start()
    fd = os.open(disk.mountpoint / "g", os.O_RDWR)
    os.pwrite(fd, b"E" * 4096, 4096)
    disk.command("hold")  # a flush that never ends: the write stays pending
    flusher = threading.Thread(target=fdatasync_until_the_power_goes, args=(fd,), daemon=True)
    flusher.start()
    flusher.join(0.5)
    assert flusher.is_alive()
    report = disk.power_loss(seed=1, fraction=0.0, torn=True)
    assert report["torn_pieces"] == 1, report  # the page's first 2 KiB reached the disk
    assert (disk.backing / "g").read_bytes()[4096:8192] == b"E" * 2048 + b"A" * 2048
    with contextlib.suppress(OSError):  # the mount is gone
        os.close(fd)

    disk.start()
    fd = os.open(disk.mountpoint / "g", os.O_RDWR)
    os.pwrite(fd, b"D" * 4096, 0)
    os.close(fd)
    assert disk.shutdown()["applied_writes"] == 1
    assert (disk.backing / "g").read_bytes()[:4096] == b"D" * 4096


# -- (a) the source loses power ----------------------------------------------------------------


@pytest.mark.parametrize(("seed", "how"), CASES)
def test_source_power_loss_recovers_from_the_intent_log(
    pair: PairFactory, tmp_path: Path, seed: int, how: str
) -> None:
    print(f"seed={seed} power loss by {how}")
    rng = random.Random(seed)
    alpha, beta, disk = pair("alpha")
    post_job(alpha)
    wait_state(alpha, "Mirroring")

    window = rng.randrange(0, (SIZE - WINDOW) // MiB + 1) * MiB
    load = Load(alpha.nbd_socket, seed, window)
    cut = run_load_then_cut(load, rng)
    alpha.kill()
    crash = power_loss(disk, seed, how)
    load.join(30)
    context = f"seed={seed} {how}: {crash}; {len(load.writes)} writes, {len(load.flushes)} flushes"
    print(context)
    assert load.ended_by is not None, "the client did not notice the power loss"
    assert not load.failures, (context, load.failures)

    # What alpha's disk holds now, read before anything restarts.
    volume = disk.backing / "data1.img"
    vkil = disk.backing / "state" / "bitmaps" / "web@beta:data1.vkil"
    problems, lost = check_sectors(load, volume, load.durable_floor(cut), cut)
    assert not problems, f"{context}: a durable write is missing on alpha: {problems}"
    left_open, store = recovered_log(vkil, tmp_path)
    try:
        bitmap, recovered = store.bitmap, store.recovered_bytes
    finally:
        store.close()
    assert left_open, f"{context}: the intent log says it was closed cleanly"
    differing = differing_regions(volume, beta.volume_path(beta.volumes[0]))
    unmarked = [r for r in differing if not bitmap.is_marked(r)]
    marked = bitmap.marked_bytes
    print(
        f"{lost} acknowledged sectors lost; {len(differing)} regions differ; "
        f"recovery marks {marked} bytes ({recovered} from the activity log)"
    )
    assert not unmarked, (
        f"{context}: {len(unmarked)} of {len(differing)} differing 4 KiB regions are not marked "
        f"in alpha's recovered intent log (invariant 2); first: {unmarked[:10]}"
    )
    bound = (len(load.extents) + LOOKAHEAD) * EXTENT
    assert 0 < recovered <= marked <= bound, f"{context}: recovery marks {marked} > {bound}"
    crashed = sha256(volume)

    # Power back: remount, restart alpha, partial resync.
    disk.start()
    since = len(alpha.log_text())
    alpha.start(timeout=60)
    back = wait_state(alpha, "Mirroring")
    resent = back["sent_bytes"]  # a fresh daemon: everything it sent was resync
    assert back["out_of_sync_bytes"] == 0, back
    assert marked <= resent <= marked + MiB, f"{context}: marked {marked}, resync sent {resent}"
    assert resent <= SIZE // 2, f"{context}: not a partial resync ({resent} bytes)"
    check_log(alpha, since, resent)

    assert (alpha.stop(), beta.stop()) == (0, 0)
    disk.shutdown()
    assert sha256(volume) == crashed, f"{context}: recovery changed the source's data"
    assert sha256(beta.volume_path(beta.volumes[0])) == crashed, f"{context}: beta differs"


# -- (b) the target loses power ----------------------------------------------------------------


@pytest.mark.parametrize(("seed", "how"), CASES)
def test_target_power_loss_is_repaired_by_partial_resync(
    pair: PairFactory, tmp_path: Path, seed: int, how: str
) -> None:
    print(f"seed={seed} power loss by {how}")
    rng = random.Random(seed)
    alpha, beta, disk = pair("beta")
    post_job(alpha)
    wait_state(alpha, "Mirroring")

    window = rng.randrange(0, (SIZE - WINDOW) // MiB + 1) * MiB
    load = Load(alpha.nbd_socket, seed, window)
    cut = run_load_then_cut(load, rng)
    beta.kill()
    crash = power_loss(disk, seed, how)
    wait_state(alpha, "Resync pending", timeout=10)
    acked, deadline = load.acked, time.monotonic() + 20
    while load.acked < acked + 20:  # the application goes on writing while the target is away
        assert load.is_alive(), f"the client stopped: {load.ended_by} {load.failures}"
        assert time.monotonic() < deadline, "writes stalled while the target was away"
        time.sleep(0.01)
    load.halt.set()
    load.join(30)
    context = f"seed={seed} {how}: {crash}; {len(load.writes)} writes, {len(load.flushes)} flushes"
    print(context)
    assert load.ended_by is None, f"{context}: the source failed its client: {load.ended_by}"
    assert not load.failures, (context, load.failures)

    # What beta's disk holds now, against alpha's volume and alpha's durable bitmap.
    volume = disk.backing / "data1.img"
    problems, lost = check_sectors(load, volume, load.durable_floor(cut), cut)
    assert not problems, f"{context}: a write alpha called durable is missing on beta: {problems}"
    bitmap = durable_bitmap(alpha.directory / "state" / "bitmaps" / "web@beta:data1.vkil")
    differing = differing_regions(alpha.volume_path(alpha.volumes[0]), volume)
    unmarked = [r for r in differing if not bitmap.is_marked(r)]
    away = mirror_view(alpha)
    print(
        f"{lost} acknowledged sectors missing on beta; {len(differing)} regions differ; "
        f"alpha marks {away['out_of_sync_bytes']} bytes"
    )
    assert not unmarked, (
        f"{context}: {len(unmarked)} of {len(differing)} differing 4 KiB regions are not marked "
        f"in alpha's durable bitmap (invariant 2); first: {unmarked[:10]}"
    )
    marked, sent = away["out_of_sync_bytes"], away["sent_bytes"]
    assert 0 < marked <= WINDOW, (context, away)

    # Power back: remount, restart beta; alpha reconnects and resyncs what it marked.
    disk.start()
    since = len(alpha.log_text())
    beta.start(timeout=60)
    assert beta.status()["volumes"][0]["role"] == "target", "beta lost its lock"  # type: ignore[index]
    back = wait_state(alpha, "Mirroring")
    delta = back["sent_bytes"] - sent
    assert back["out_of_sync_bytes"] == 0, back
    assert marked <= delta <= marked + MiB, f"{context}: marked {marked}, resync sent {delta}"
    check_log(alpha, since, delta)

    assert (alpha.stop(), beta.stop()) == (0, 0)
    disk.shutdown()
    expected = load.newest()
    for path in (alpha.volume_path(alpha.volumes[0]), volume):
        now = time.monotonic()
        problems, _ = check_sectors(load, path, load.durable_floor(now), now)
        assert not problems, (context, path, problems)
        with path.open("rb") as f:
            f.seek(window)
            assert f.read(WINDOW) == expected, f"{context}: {path} lacks acknowledged writes"
    assert sha256(volume) == sha256(alpha.volume_path(alpha.volumes[0])), context


# -- (c) a bitmap page torn by the power loss ------------------------------------------------------

TORN_SIZE = 256 * MiB  # three bitmap pages of 4 KiB regions (32640 regions each)
PAGE_RANGE = 32640 * REGION  # the volume bytes one bitmap page covers
WRITE_AT = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[3])]) * 65536, int(sys.argv[2]))
h.shutdown()
"""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.02)


def test_a_bitmap_page_torn_by_power_loss_is_found_and_resynced(
    failing_disk: PowerLossDisk, start_node: NodeFactory
) -> None:
    """alpha's intent logs live on the FUSE disk.  With beta away, a write marks a region of
    bitmap page 1, and the page is persisted; the disk then stops finishing flushes, a second
    write marks another region of page 1, and the page's new image is written but never
    flushed when the power goes: the disk keeps its first 2 KiB (new) and not the rest (old).
    The torn page fails its check when alpha starts again: every region it covers is marked,
    the mirror says so, and the partial resync of that page's range leaves identical volumes."""
    volumes = [VolumeSpec("data1", TORN_SIZE)]
    beta = start_node("beta", volumes)
    alpha = start_node(
        "alpha", volumes, peers={"beta": beta.peer_port}, bitmap_dir=failing_disk.mountpoint
    )
    post_job(alpha)
    wait_state(alpha, "Mirroring")
    assert beta.stop() == 0
    log = failing_disk.backing / "web@beta:data1.vkil"
    first, second = 130 * MiB, 131 * MiB  # both in page 1, in the first half of its block

    def durably_marked(offset: int) -> bool:
        return read_durable_bitmap(log)[1].is_marked(offset // REGION)

    assert libnbd(WRITE_AT, alpha.uri(), str(first), "1").returncode == 0
    wait_for("durable mark of the first write", lambda: durably_marked(first))
    failing_disk.command("hold")
    assert libnbd(WRITE_AT, alpha.uri(), str(second), "2").returncode == 0
    wait_for("pending page write", lambda: failing_disk.command("stats")["pending_writes"] > 0)
    assert alpha.process is not None
    os.kill(alpha.process.pid, signal.SIGKILL)  # the power goes for both; the daemon's thread
    report = failing_disk.power_loss(seed=1, fraction=0.0, torn=True)  # in fsync dies with it
    alpha.kill()
    assert report["torn_pieces"] >= 1, report
    damage = read_durable_bitmap(log)[2]
    assert [d.page for d in damage] == [1], damage  # the tear is there, and seen

    failing_disk.start()
    since = len(alpha.log_text())
    alpha.start()
    view = mirror_view(alpha)
    assert "bitmap page 1 (regions 32640-65279) failed its check" in view["last_error"], view
    beta.start()
    wait_state(alpha, "Mirroring")
    lines = alpha.log_text()[since:].splitlines()
    finished = [line for line in lines if "resync finished" in line]
    assert finished and f" bytes={PAGE_RANGE} " in finished[-1], finished  # page 1's range
    assert alpha.stop() == 0 and beta.stop() == 0
    assert sha256(alpha.directory / "data1.img") == sha256(beta.directory / "data1.img")
