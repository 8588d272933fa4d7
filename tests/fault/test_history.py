"""The nemesis's own parts, without a cluster: the schedule replays, the checker catches.

A checker that cannot fail proves nothing, so each of its rules is shown catching an image
that breaks it: a lost acknowledged write, a copy out of write order, garbage, a block
older than the last FLUSH after a power cut; and shown passing what NBD allows (an
unanswered write that landed or not, unflushed writes lost with the power).
"""

from __future__ import annotations

from pathlib import Path

from tests.fault.history import GARBAGE, History, differing_bytes, read_image
from tests.fault.schedule import KINDS, describe, schedule
from tests.support.acked_writer import BLOCK, block_bytes

BLOCKS = 4


def history_of(tmp_path: Path, lines: list[str]) -> History:
    log = tmp_path / "workload.log"
    log.write_text("".join(f"{line} {n}.0\n" for n, line in enumerate(lines)))
    history = History(log, BLOCKS)
    history.read()
    return history


def test_a_seed_gives_the_same_schedule_every_time_and_another_seed_another() -> None:
    assert describe(schedule(7, 40, 2)) == describe(schedule(7, 40, 2))
    assert describe(schedule(7, 40, 2)) != describe(schedule(8, 40, 2))
    drawn = {fault.kind for seed in range(30) for fault in schedule(seed, 20, 2)}
    assert drawn == set(KINDS)  # every kind comes up
    only = schedule(3, 10, 1, kinds=["partition", "failover"])
    assert {fault.kind for fault in only} <= {"partition", "failover"}
    assert all(fault.target == 0 and 1.0 <= fault.duration <= 5.0 for fault in only)


def test_an_acknowledged_write_must_be_there_and_an_unanswered_one_may_be(tmp_path: Path) -> None:
    history = history_of(tmp_path, ["S 1 0", "A 1", "S 2 1", "A 2", "S 3 0", "E 3 EIO"])
    assert history.acked_writes == 2 and len(history.failures) == 1
    assert history.lost_writes({0: 1, 1: 2, 2: None, 3: None}) == []  # 3 did not land
    assert history.lost_writes({0: 3, 1: 2, 2: None, 3: None}) == []  # 3 landed
    lost = history.lost_writes({0: 1, 1: None, 2: None, 3: None})
    assert lost == ["block 1 holds zeros, may hold ['v2']"]
    assert history.lost_writes({0: 1, 1: 2, 2: GARBAGE, 3: None}) == [
        "block 2 holds garbage, may hold ['zeros']"
    ]


def test_a_power_cut_of_the_source_loses_only_what_no_flush_covered(tmp_path: Path) -> None:
    lines = ["S 1 0", "A 1", "F 1", "FA 1", "S 2 0", "A 2", "S 3 1", "A 3"]
    history = history_of(tmp_path, lines)
    assert history.lost_writes({0: 1, 1: 3, 2: None, 3: None})  # v2 was acknowledged
    history.power_cut()
    assert history.lost_writes({0: 1, 1: None, 2: None, 3: None}) == []  # unflushed: gone
    assert history.lost_writes({0: 2, 1: 3, 2: None, 3: None}) == []  # or kept
    assert history.lost_writes({0: None, 1: 3, 2: None, 3: None})  # v1 was flushed
    assert history.order_anomaly({0: 2, 1: None, 2: None, 3: None}) is None  # order unknown
    history.rebase({0: 2, 1: None, 2: None, 3: None})
    assert history.order_known and history.lost_writes({0: 2, 1: None, 2: None, 3: None}) == []


def test_an_asynchronous_copy_must_be_a_prefix_of_the_writes(tmp_path: Path) -> None:
    lines = ["S 1 0", "A 1", "S 2 1", "A 2", "S 3 0", "A 3", "S 4 2", "A 4"]
    history = history_of(tmp_path, lines)
    assert history.order_anomaly({0: 1, 1: 2, 2: None, 3: None}) is None  # up to v2
    assert history.order_anomaly({0: 3, 1: 2, 2: 4, 3: None}) is None  # everything
    skipped = history.order_anomaly({0: 1, 1: None, 2: 4, 3: None})  # v4 without v2, v3
    assert skipped is not None and "write order broken" in skipped
    assert history.order_anomaly({0: 3, 1: None, 2: None, 3: None}) is not None  # v3, no v2


def test_images_are_read_block_by_block_and_compared_in_4k_blocks(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(block_bytes(0, 5) + bytes(BLOCK) + b"x" * BLOCK + block_bytes(2, 1))
    data, found = read_image(image, BLOCKS)
    assert found == {0: 5, 1: None, 2: GARBAGE, 3: GARBAGE}  # block 3 holds block 2's data
    other = bytearray(data)
    other[BLOCK + 7] = 1
    assert differing_bytes(data, bytes(other)) == BLOCK
    assert differing_bytes(data, data[:BLOCK]) == len(data)
