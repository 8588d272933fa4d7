"""A damaged intent log is never trusted: the resync it leads to leaves identical volumes.

How this works: the reproduction of the report, for every kind of damage.  alpha mirrors
data1 to beta; beta stops; 16 MiB are written on alpha (marked in the intent log only); alpha
stops cleanly; the log file is damaged on disk; both start again.  Each case must end with
the mirror Mirroring over identical volumes, after the resync its damage calls for, and with
the damage named in the mirror's last error while it was repaired:

    damage                                   resync
    bitmap pages half zeroed, half random    partial: the ranges of the pages that failed
    one marked bit cleared                   partial: the range of its page
    the file truncated                       full
    the header damaged                       full
    two mirrors' logs swapped                full, on both

The damage is done where the log's own header says the bitmap is (format 1 kept the raw
image at 12288; format 2 seals it in pages), so this test runs against either format.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.support.mirroring import (
    libnbd,
    mirror_view,
    mirrored_pair,
    pair,
    post_job,
    sha256,
    wait_state,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20
SIZE = 384 * MiB  # four bitmap pages of 4 KiB regions
REGION = 4096
WRITTEN = (130 * MiB, 16 * MiB)  # inside bitmap page 1 (regions 32640-65279)
PAGE_BYTES, SEAL = 4080, 12  # format 2: image bytes per page, seal before them
BITMAP_OFFSET = 3 * 4096

pytestmark = pytest.mark.timeout(240)


def log_path(node: LocalNode, job: str = "web", target: str = "beta:data1") -> Path:
    return node.directory / "state" / "bitmaps" / f"{job}@{target}.vkil"


def image_at(log: Path, index: int) -> int:
    """The file offset of byte ``index`` of the bitmap image, in either format."""
    version = struct.unpack_from(">H", log.read_bytes(), 4)[0]
    if version == 1:
        return BITMAP_OFFSET + index
    return BITMAP_OFFSET + (index // PAGE_BYTES) * 4096 + SEAL + index % PAGE_BYTES


def patch(log: Path, offset: int, data: bytes) -> None:
    with log.open("r+b") as raw:
        raw.seek(offset)
        raw.write(data)


def scribble_pages(log: Path) -> None:
    """Every 4 KiB of the bitmap: first half zeros, second half random (a bad sector)."""
    for block in range(BITMAP_OFFSET, log.stat().st_size, 4096):
        patch(log, block, bytes(2048) + os.urandom(2048))


def clear_one_marked_bit(log: Path) -> None:
    first = WRITTEN[0] // REGION + 8  # a byte whose 8 regions were all written
    offset = image_at(log, first // 8)
    assert log.read_bytes()[offset] == 0xFF
    patch(log, offset, b"\xfe")


def truncate(log: Path) -> None:
    os.truncate(log, log.stat().st_size // 2)


def damage_header(log: Path) -> None:
    patch(log, 8, b"\x00\x00\x00\x01")  # the volume size's high bytes


DAMAGE: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    # name: (damage, what the mirror's last error says, a full resync)
    "pages half zeros, half random": (scribble_pages, "failed (its|their) checks?", False),
    "one marked bit cleared": (clear_one_marked_bit, "bitmap page 1 .* failed its check", False),
    "file truncated": (truncate, "truncated.*full resync started", True),
    "header damaged": (damage_header, "damaged header.*full resync started", True),
}


WRITE = """
import os, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(os.urandom(int(sys.argv[3])), int(sys.argv[2]))
h.flush()
h.shutdown()
"""


def write_while_beta_is_away(alpha: LocalNode, beta: LocalNode, volume: str = "data1") -> None:
    """beta stops, 16 MiB are written on alpha, alpha stops cleanly: only the log knows."""
    assert beta.stop() == 0
    offset, length = WRITTEN
    done = libnbd(WRITE, alpha.uri(volume), str(offset), str(length))
    assert done.returncode == 0, done.stderr
    assert alpha.stop() == 0


def resynced_bytes(node: LocalNode, since: int, job: str = "web") -> int:
    finished = [
        line for line in node.log_text()[since:].splitlines()
        if "event='resync finished'" in line and f"job='{job}'" in line
    ]  # fmt: skip
    assert finished, node.log_text()[since:][-3000:]
    found = re.search(r" bytes=(\d+) ", finished[-1])
    assert found, finished[-1]
    return int(found.group(1))


def restart_and_repair(alpha: LocalNode, beta: LocalNode, expected: str, job: str = "web") -> int:
    """alpha starts alone (its mirror names the damage), then beta: back to Mirroring;
    returns the bytes the resync covered."""
    since = len(alpha.log_text())
    alpha.start()
    view = mirror_view(alpha, job)
    assert view["state"] == "Resync pending", view
    assert view["last_error"] and re.search(expected, view["last_error"]), view
    beta.start()
    wait_state(alpha, "Mirroring", timeout=120, job=job)
    assert mirror_view(alpha, job)["last_error"] is None  # a completed resync proves it repaired
    return resynced_bytes(alpha, since, job)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_intent_log_ends_in_identical_volumes(start_node: NodeFactory, name: str) -> None:
    damage, expected, full = DAMAGE[name]
    alpha, beta = pair(start_node, "384MiB")
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring", timeout=120)
    write_while_beta_is_away(alpha, beta)
    damage(log_path(alpha))
    resynced = restart_and_repair(alpha, beta, expected)
    page_range = 32640 * REGION
    if full:
        assert resynced == SIZE
    elif name == "one marked bit cleared":
        assert resynced == page_range  # page 1 only: the rest of the volume is not resent
    else:
        assert resynced == SIZE  # every page failed: the four pages cover the whole volume
    assert alpha.stop() == 0 and beta.stop() == 0
    assert sha256(alpha.directory / "data1.img") == sha256(beta.directory / "data1.img")
    assert (log_path(alpha).parent / f"{log_path(alpha).name}.untrusted").exists() == full


def test_swapped_logs_of_two_mirrors_end_in_identical_volumes(start_node: NodeFactory) -> None:
    volumes = [VolumeSpec("data1", "384MiB"), VolumeSpec("data2", "96MiB")]
    alpha, beta = pair(start_node, beta_volumes=volumes, alpha_volumes=volumes)
    assert post_job(alpha).status_code == 201
    assert post_job(alpha, "db", "alpha:data2", "beta:data2").status_code == 201
    wait_state(alpha, "Mirroring", timeout=120)
    wait_state(alpha, "Mirroring", timeout=120, job="db")
    write_while_beta_is_away(alpha, beta)
    web, db = log_path(alpha), log_path(alpha, "db", "beta:data2")
    swap = web.with_name("swap")
    web.rename(swap)
    db.rename(web)
    swap.rename(db)
    since = len(alpha.log_text())
    alpha.start()
    for job in ("web", "db"):
        view = mirror_view(alpha, job)
        assert view["state"] == "Resync pending", view
        assert "belongs to mirror" in view["last_error"], view
    beta.start()
    for job in ("web", "db"):
        wait_state(alpha, "Mirroring", timeout=120, job=job)
    assert resynced_bytes(alpha, since, "web") == SIZE
    assert resynced_bytes(alpha, since, "db") == 96 * MiB
    assert alpha.stop() == 0 and beta.stop() == 0
    for volume in ("data1", "data2"):
        assert sha256(alpha.directory / f"{volume}.img") == sha256(beta.directory / f"{volume}.img")


WRITE_REFUSED = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("read-only" if h.is_read_only() else "writable")
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error as exc:
    print("refused:", exc.errno)
h.shutdown()
"""


def test_a_log_that_cannot_be_replaced_locks_the_source_volume(
    failing_disk: PowerLossDisk, start_node: NodeFactory
) -> None:
    """The bitmap directory's disk fails: the log is unreadable and no new one can be made.
    The volume then takes no writes (nothing would track them for beta) until the disk is
    healed and the node restarted, which starts a full resync."""
    alpha, _ = mirrored_pair(start_node, bitmap_dir=failing_disk.mountpoint)
    assert alpha.stop() == 0
    failing_disk.command("fail EIO read write fsync")
    alpha.start()
    view = mirror_view(alpha)
    assert view["state"] == "Unknown", view
    assert "no new intent log could be made" in view["last_error"], view
    with alpha.api() as api:
        volume = {v["name"]: v for v in api.get("/volumes").json()}["data1"]
    assert "its mirror to beta:data1 cannot track writes" in volume["locked"], volume
    done = libnbd(WRITE_REFUSED, alpha.uri())
    assert done.stdout.split("\n")[:2] == ["read-only", "refused: EPERM"], done
    assert alpha.stop() == 0
    failing_disk.command("heal")
    since = len(alpha.log_text())
    alpha.start()
    wait_state(alpha, "Mirroring", timeout=60)
    assert resynced_bytes(alpha, since) == 64 * MiB
    with alpha.api() as api:
        assert {v["name"]: v for v in api.get("/volumes").json()}["data1"]["locked"] is None
