"""The intent-log file: durable bitmap pages, activity-log snapshots, crash recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from volkeeper.core.activity_log import BLOCK_BYTES
from volkeeper.errors import VolumeError
from volkeeper.io.intent_store import RING_OFFSET, Generations, Geometry, IntentStore

MiB = 1024 * 1024
EXTENT = 1 * MiB
GEOMETRY = Geometry(
    volume_size=64 * MiB + 4096, region_size=4096, extent_bytes=EXTENT, al_capacity=4
)


def make(tmp_path: Path, *, all_dirty: bool = False) -> IntentStore:
    return IntentStore.create(
        tmp_path / "web.vkil", GEOMETRY, Generations(11, 7), all_dirty=all_dirty
    )


def activate(store: IntentStore, offset: int, length: int) -> None:
    """What the write path does for a write to a cold extent."""
    extents = store.activity_log.extents_of(offset, length)
    if not store.activity_log.pin(extents):
        snapshot = store.activity_log.transaction()
        assert snapshot is not None
        store.write_snapshot(snapshot)
        store.activity_log.committed(snapshot)
    assert store.activity_log.ready(extents)


def test_new_log_for_a_full_resync_has_every_region_marked(tmp_path: Path) -> None:
    make(tmp_path, all_dirty=True).close()
    store = IntentStore.open(tmp_path / "web.vkil")
    assert store.bitmap.marked_bytes == GEOMETRY.volume_size
    assert store.recovered_bytes == 0
    assert (store.generations.current, store.generations.previous) == (11, 7)
    store.close()


def test_clean_close_keeps_exactly_the_marked_regions(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 5 * MiB, 4096)
    store.bitmap.mark(5 * MiB, 4096)
    store.bitmap.mark(64 * MiB, 4096)  # the short last region
    store.persist_bitmap()
    store.close()
    again = IntentStore.open(tmp_path / "web.vkil")
    assert again.bitmap.marked_bytes == 8192
    assert again.recovered_bytes == 0
    assert list(again.bitmap.runs()) == [(5 * MiB // 4096, 1), (64 * MiB // 4096, 1)]
    again.close()


def test_crash_marks_every_extent_of_the_last_snapshot(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 3 * MiB + 100, 10)
    activate(store, 9 * MiB, 2 * MiB)  # two extents
    store.bitmap.mark(40 * MiB, 4096)
    store.persist_bitmap()
    del store  # the daemon died: no close(), the header still says "open"
    recovered = IntentStore.open(tmp_path / "web.vkil")
    assert recovered.recovered_bytes == 3 * EXTENT
    marked = {first for first, _ in recovered.bitmap.runs(max_regions=1)}
    for extent in (3, 9, 10):
        assert extent * EXTENT // 4096 in marked
    assert 40 * MiB // 4096 in marked
    recovered.close()
    assert IntentStore.open(tmp_path / "web.vkil").recovered_bytes == 0  # now clean


def test_a_torn_snapshot_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store = make(tmp_path)
    activate(store, 0, 1)  # snapshot 1: {0}, ring block 1
    store.activity_log.unpin(store.activity_log.extents_of(0, 1))
    activate(store, 2 * MiB, 1)  # snapshot 2: {0, 2}, ring block 0
    path = store.path
    del store
    with path.open("r+b") as raw:  # the write of snapshot 2 was cut short by the power loss
        raw.seek(RING_OFFSET + 100)
        raw.write(os.urandom(200))
    recovered = IntentStore.open(path)
    assert recovered.recovered_bytes == EXTENT  # snapshot 1 only: extent 0
    recovered.close()


def test_corrupt_or_foreign_files_are_refused_by_name(tmp_path: Path) -> None:
    make(tmp_path).close()
    path = tmp_path / "web.vkil"
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="checksum"):
        IntentStore.open(path)
    other = tmp_path / "other"
    other.write_bytes(bytes(BLOCK_BYTES * 4))
    with pytest.raises(VolumeError, match="not a volkeeper intent log"):
        IntentStore.open(other)
    with pytest.raises(VolumeError, match="cannot open"):
        IntentStore.open(tmp_path / "missing")
    with pytest.raises(VolumeError, match="cannot open"):
        make(tmp_path)  # exists already: never overwritten


def test_generations_survive_reopen(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.set_generations(Generations(99, 11))
    store.close()
    again = IntentStore.open(tmp_path / "web.vkil")
    assert (again.generations.current, again.generations.previous) == (99, 11)
    again.close()
