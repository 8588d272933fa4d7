"""The activity log against a crash model: no issued write is ever outside the durable log."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from volkeeper.core.activity_log import (
    BLOCK_BYTES,
    MAX_CAPACITY,
    RING_BLOCKS,
    ActivityLog,
    Snapshot,
    decode_block,
    recover,
)

EXTENT = 4096  # small extents keep the model small; the code only needs a power of two


def test_snapshot_round_trip_and_torn_block() -> None:
    snapshot = Snapshot(7, EXTENT, (1, 5, 9))
    block = snapshot.encode()
    assert len(block) == BLOCK_BYTES
    assert decode_block(block) == snapshot
    torn = block[:100] + bytes(BLOCK_BYTES - 100)
    assert decode_block(torn) is None
    assert decode_block(bytes(BLOCK_BYTES)) is None
    assert recover([torn, Snapshot(6, EXTENT, (1, 5)).encode()]) == Snapshot(6, EXTENT, (1, 5))


def test_full_capacity_fits_one_block() -> None:
    snapshot = Snapshot(1, EXTENT, tuple(range(MAX_CAPACITY)))
    assert decode_block(snapshot.encode()) == snapshot


def test_hot_extents_need_no_transaction() -> None:
    log = ActivityLog(capacity=4, extent_bytes=EXTENT)
    extents = log.extents_of(0, 100)
    assert not log.pin(extents)
    snapshot = log.transaction()
    assert snapshot is not None and snapshot.extents == (0,)
    log.committed(snapshot)
    assert log.ready(extents)
    log.unpin(extents)
    assert log.pin(log.extents_of(10, 10))  # same extent, still hot: no metadata write
    assert log.transaction() is None


def test_a_snapshot_that_could_not_be_written_is_written_again() -> None:
    """Found by the nemesis: after a failed snapshot write the log kept it "in flight", so
    no later transaction was ever due and writes to a cold extent waited forever."""
    log = ActivityLog(capacity=4, extent_bytes=EXTENT)
    extents = log.extents_of(0, 100)
    log.pin(extents)
    failed = log.transaction()
    assert failed is not None
    log.abandoned(failed)
    assert not log.ready(extents)
    again = log.transaction()
    assert again is not None and again.extents == (0,) and again.number > failed.number
    log.committed(again)
    assert log.ready(extents)
    assert log.transaction() is None
    with pytest.raises(ValueError):
        log.abandoned(again)


def test_waiting_writes_share_one_transaction_and_lru_eviction() -> None:
    log = ActivityLog(capacity=2, extent_bytes=EXTENT)
    for extent in (0, 1):
        log.pin([extent])
    first = log.transaction()
    assert first is not None and first.extents == (0, 1)
    log.committed(first)
    log.unpin([0])
    log.unpin([1])
    log.pin([1])  # 1 is now most recently used
    log.unpin([1])
    log.pin([2])
    second = log.transaction()
    assert second is not None and second.extents == (1, 2)  # 0 was least recently used


def test_pinned_extents_are_never_evicted() -> None:
    log = ActivityLog(capacity=1, extent_bytes=EXTENT)
    log.pin([0])
    snapshot = log.transaction()
    assert snapshot is not None
    log.committed(snapshot)
    assert not log.pin([1])
    assert log.transaction() is None  # full of pinned extents: extent 1 waits
    log.unpin([0])
    later = log.transaction()
    assert later is not None and later.extents == (1,)


def _commit(log: ActivityLog) -> Snapshot:
    snapshot = log.transaction()
    assert snapshot is not None
    log.committed(snapshot)
    return snapshot


def test_a_sequential_writer_activates_the_next_extents_in_the_same_transaction() -> None:
    log = ActivityLog(capacity=16, extent_bytes=EXTENT)
    log.pin([0])
    log.anticipate(0, 512, 4, limit=100)  # nothing active before extent 0: no run yet
    assert _commit(log).extents == (0,)
    assert not log.pin([1])
    log.anticipate(EXTENT + 512, 512, 4, limit=100)  # not at extent 1's start: random
    assert _commit(log).extents == (0, 1)
    assert not log.pin([2])
    log.anticipate(2 * EXTENT - 512, 1024, 4, limit=100)  # crosses into 2 from 1: a run
    assert _commit(log).extents == (0, 1, 2, 3, 4, 5, 6)
    for extent in (3, 4, 5, 6):
        assert log.pin([extent])  # already durable: no transaction, no wait
    assert log.transaction() is None
    assert log.pinned_extents == 7


def test_anticipated_extents_stop_at_the_limit_and_are_evicted_first() -> None:
    log = ActivityLog(capacity=4, extent_bytes=EXTENT)
    log.pin([6])
    _commit(log)
    log.pin([7])
    log.anticipate(7 * EXTENT, EXTENT, 8, limit=9)  # the volume has 9 extents: only 8 is added
    assert _commit(log).extents == (6, 7, 8)
    log.pin([1])
    log.pin([2])
    assert _commit(log).extents == (1, 2, 6, 7)  # 8 was never pinned: it made room first


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ActivityLog(capacity=MAX_CAPACITY + 1)
    with pytest.raises(ValueError, match="power of two"):
        ActivityLog(extent_bytes=3 * 1024 * 1024)


class CrashModel(RuleBasedStateMachine):
    """Writes, snapshot persistence (possibly torn) and crashes at any point."""

    def __init__(self) -> None:
        super().__init__()
        self.disk = [bytes(BLOCK_BYTES)] * RING_BLOCKS
        self.log = ActivityLog(capacity=2, extent_bytes=EXTENT)
        self.waiting: list[range] = []
        self.issued: list[range] = []  # writes sent to the volume, not yet durable everywhere
        self.writing: Snapshot | None = None

    @rule(offset=st.integers(0, 4 * EXTENT), length=st.integers(1, 2 * EXTENT))
    def start_write(self, offset: int, length: int) -> None:
        extents = self.log.extents_of(offset, length)
        (self.issued if self.log.pin(extents) else self.waiting).append(extents)

    @precondition(lambda self: self.writing is None)
    @rule()
    def begin_transaction(self) -> None:
        self.writing = self.log.transaction()

    @precondition(lambda self: self.writing is not None)
    @rule()
    def transaction_durable(self) -> None:
        assert self.writing is not None
        self.disk[self.writing.ring_block] = self.writing.encode()
        self.log.committed(self.writing)
        self.writing = None
        self.poll_waiting()

    @rule()
    def poll_waiting(self) -> None:
        """Adapters may re-check waiting writes at any moment, not only after a commit."""
        still = []
        for extents in self.waiting:
            (self.issued if self.log.ready(extents) else still).append(extents)
        self.waiting = still

    @precondition(lambda self: self.issued)
    @rule(index=st.integers(0, 100))
    def write_durable_everywhere(self, index: int) -> None:
        self.log.unpin(self.issued.pop(index % len(self.issued)))

    @rule(torn=st.booleans())
    def crash(self, torn: bool) -> None:
        if self.writing is not None and torn:  # the snapshot write was cut short
            block = self.writing.encode()
            self.disk[self.writing.ring_block] = block[:123] + bytes(BLOCK_BYTES - 123)
        recovered = recover(self.disk)
        on_disk = set(recovered.extents) if recovered else set()
        for extents in self.issued:
            assert set(extents) <= on_disk, "a write was issued outside the durable log"
        self.log = ActivityLog(capacity=2, extent_bytes=EXTENT, recovered=recovered)
        self.waiting, self.issued, self.writing = [], [], None

    @invariant()
    def issued_writes_are_covered(self) -> None:
        for extents in self.issued:
            assert self.log.ready(extents) or set(extents) <= self.log.active_extents


TestCrashModel = CrashModel.TestCase
TestCrashModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_extent_evicted_by_the_snapshot_being_written_is_not_ready() -> None:
    log = ActivityLog(capacity=1, extent_bytes=EXTENT)
    log.pin([0])
    first = log.transaction()
    assert first is not None
    log.committed(first)
    log.unpin([0])
    log.pin([1])
    second = log.transaction()  # evicts 0; still in the durable snapshot until committed
    assert second is not None and second.extents == (1,)
    assert not log.pin([0])
    assert not log.ready([0]), "0 leaves the log with the snapshot being written"
