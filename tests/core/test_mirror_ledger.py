"""The ledger's rules, one by one (the engine's state machine, tests/core/test_mirror_engine.py,
drives them under arbitrary interleavings against a model of the target's disk)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from volkeeper.core.mirror_ledger import Ledger
from volkeeper.core.ready import Sent

REGION = 4096


@dataclass(eq=False)
class Op:
    name: str


def write(ledger: Ledger[Op, Op], sequence: int, offset: int, owed: bool = True) -> Op:
    op = Op(f"write {sequence}")
    entry = Sent(op, op, "write", offset, REGION, owed, size=REGION)
    ledger.queued(entry)
    ledger.sent(sequence, entry, 0.0)
    return op


def test_ops_not_sent_keep_the_intent_rule() -> None:
    """A kept write is marked and replied to; its pin goes only after the mark is persisted.
    A Broken mirror's write is done with at once; a FLUSH covers only what is marked."""
    ledger: Ledger[Op, Op] = Ledger(REGION)
    op, flush = Op("write"), Op("flush")
    kept = ledger.kept(op, op, 2 * REGION, REGION, is_flush=False)
    assert (kept.mark, kept.release, kept.reply) == ([(2 * REGION, REGION)], [op], [op])
    assert (kept.unpin_now, kept.unpin_after_persist) == ((), [op])
    for ready in (ledger.kept(flush, flush, 0, 0, True), Ledger.untracked(flush, flush, True)):
        assert (ready.reply, ready.durable_now, ready.mark) == ([flush], [flush], ())
    gone = Ledger.untracked(op, op, is_flush=False)
    assert (gone.mark, gone.release, gone.reply, gone.unpin_now) == ((), [op], [op], [op])


def test_an_acked_write_stays_undurable_until_a_later_flush_is_released() -> None:
    ledger: Ledger[Op, Op] = Ledger(REGION)
    first, second = write(ledger, 1, 0), write(ledger, 3, REGION)
    acked = ledger.ack(1, 0, 0.001)
    assert (acked.release, acked.reply, acked.unpin_now) == ((first,), (first,), ())
    ledger.ack(3, 0, 0.002)
    assert ledger.released(2).unpin_now == [first]  # the FLUSH sent as 2 covers write 1 only
    assert ledger.released(4).unpin_now == [second]
    assert ledger.queued_bytes == 0 and not ledger.undurable


def test_an_error_ack_marks_everything_open_and_names_the_frame() -> None:
    ledger: Ledger[Op, Op] = Ledger(REGION)
    write(ledger, 1, 0)
    write(ledger, 2, 5 * REGION)
    ledger.ack(1, 0, 0.0)
    failed = ledger.ack(2, errno.ENOSPC, 0.0)
    assert failed.failure == (errno.ENOSPC, "write at 20480, 4.0 KiB")
    assert sorted(failed.mark) == [(0, REGION), (5 * REGION, REGION)]
    assert failed.unpin_now == () and len(failed.unpin_after_persist) == 2


def test_a_resync_chunk_is_cleared_only_when_proven_and_unraced() -> None:
    ledger: Ledger[Op, Op] = Ledger(REGION)
    clean, raced, failed = (ledger.chunk(first, 1, first * REGION, REGION) for first in (0, 2, 4))
    for sequence, chunk in enumerate((clean, raced, failed), start=1):
        ledger.chunk_frame(chunk)
        ledger.chunk_frame_sent(chunk, sequence)
    ledger.race(2 * REGION + 100, 1)
    assert ledger.ack(1, 0, 0.0).clear == () and ledger.ack(2, 0, 0.0).clear == ()
    assert ledger.commit()
    early = ledger.committed()  # frame 3 not ACKed yet: the target answered out of order
    assert early.failure is not None and early.clear == ()
    chunk = ledger.chunk(0, 1, 0, REGION)
    ledger.chunk_frame(chunk)
    ledger.chunk_frame_sent(chunk, 9)
    ledger.ack(9, 0, 0.0)
    assert ledger.commit()
    assert ledger.committed().clear == [(0, 1)]


def test_only_the_raced_regions_of_a_resync_chunk_stay_marked() -> None:
    """A busy writer touching a block of a chunk keeps that block's region marked, not the
    whole chunk (the nemesis saw a resync under an async writer resend a 4 MiB hot set for
    30 s, every chunk raced somewhere)."""
    ledger: Ledger[Op, Op] = Ledger(REGION)
    chunk = ledger.chunk(10, 8, 10 * REGION, 8 * REGION)  # regions 10..17
    ledger.chunk_frame(chunk)
    ledger.chunk_frame_sent(chunk, 1)
    ledger.race(12 * REGION + 5, 1)  # region 12
    ledger.race(14 * REGION, 2 * REGION)  # regions 14 and 15
    ledger.race(9 * REGION, 2 * REGION)  # regions 9 (not the chunk's) and 10
    ledger.race(13 * REGION, 1)  # region 13: 12..15 are raced, 11, 16, 17 are not
    ledger.ack(1, 0, 0.0)
    assert ledger.commit()
    assert ledger.committed().clear == [(11, 1), (16, 2)]
