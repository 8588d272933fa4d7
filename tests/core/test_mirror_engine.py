"""The mirror engine against a model of the source, the wire and the target's disk.

A hypothesis state machine plays the adapter (daemon/source/mirror.py) around a real
``MirrorEngine`` and a real ``DirtyBitmap``, over an 8-region volume whose content is a version
number per region.  Every decision is the engine's: where a write goes, what an ACK, an error
ACK or a lost link leads to, what a handshake admits, when the mirror is Mirroring, what the
administrator's commands do.  The machine only carries out the ``Ready`` it gets, in the
contract's order (core/ready.py), and models everything around it:

* application writes bump a region's version on the source; each holds an activity-log pin
  from issue until the engine says to unpin it, and reaches the source *volume* (what a
  resync reads) at once or later, in issue order, as the volume's writer thread does;
* the wire has the sender's two lanes (application frames, then resync frames and questions),
  each in order, merged in any interleaving -- an application write may overtake resync data;
* the target applies frames in wire order to its *volatile* copy, a FLUSH copies volatile to
  *durable*; while its disk fails, every frame it gets is ACKed with EIO and changes nothing;
  a target crash loses the volatile copy; it reports a generation and whether it is UpToDate;
* the resync walk reads any marked run of regions (the engine learns of it, and of the writes
  in flight racing it), sends it, commits batches with a FLUSH (the engine says what to
  clear), and ends when the engine says it is complete;
* the intent log's bitmap is persisted only by the ``persist`` rule; effects the engine puts
  after persisting wait for it; a source restart starts a new engine from what was persisted
  plus the regions still pinned (the activity log's hot extents, marked at open).

The invariants, checked after every step (not while the mirror is Broken: it tracks nothing):

1. **intent before data** -- every region whose *durable* target copy differs from the source
   is marked in the *persisted* bitmap or pinned by an op covering it (a crash of either side
   right now still finds it);
2. **nothing cleared unproven** -- every region whose target copy differs from the source,
   volatile or durable (a target crash right now), is marked in the bitmap or covered by a
   write the ledger still tracks (in flight or undurable);
3. **nothing applied is undone** -- while the link is up, the target's copy differs only where
   marked or where a write is still on its way (catches resync data older than a write the
   target applied being cleared);
4. **never UpToDate while a region differs** -- while the engine says Mirroring, the target
   equals the source except for writes in flight, and the target's own UpToDate flag is only
   set by a resync the engine saw finish.

``test_the_machine_catches_a_seeded_bug`` seeds six bugs, in the ledger and in the engine,
and requires the machine to find each.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from volkeeper import _compiled
from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_engine import MAX_PING_INTERVAL, MirrorEngine
from volkeeper.core.mirror_ledger import Chunk, Ledger
from volkeeper.core.mirror_state import IllegalTransition, MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.core.ready import Ready, Sent
from volkeeper.core.resync_plan import Span

REGION = 4096
REGIONS = 8
QUEUE_LIMIT = 2  # async mode: writes sent and not ACKed (each counts 1)
PEER_TIMEOUT = 3.0  # the node's [node] peer_timeout, not the default
GENERATION = 7  # the source's


@dataclass(eq=False)
class Op:
    """The adapter's op, as the engine sees it (a token), with its activity-log pin."""

    command: str
    first: int = 0
    count: int = 0
    version: int = 0  # the source version it writes
    pinned: bool = False
    # a flush: the writes it must find on the source volume, where it went on the wire,
    # whether the target made it durable, whether it was released
    before: list[Op] = field(default_factory=list)
    place: Any = None
    target_durable: bool = False


@dataclass
class Frame:
    sequence: int
    kind: str  # "write", "flush", "resync", "record"
    first: int = 0
    versions: list[int] = field(default_factory=list)
    record: pw.DataState | None = None
    generation: int = 0  # a record's: the source's current generation when it was sent
    fails: bool = False  # the target's disk fails it


class EngineMachine(RuleBasedStateMachine):
    ledger_class: type[Ledger[Op, Op]] = Ledger
    engine_class: type[MirrorEngine[Op, Op]] = MirrorEngine

    def __init__(self) -> None:
        super().__init__()
        self.bitmap = DirtyBitmap(REGIONS * REGION, REGION)
        self.generations = Generations(GENERATION)  # the source's, as its log holds them
        self.fresh = itertools.count(GENERATION + 1)  # the ids new generations take
        self.engine = self.new_engine(MirrorState.RESYNC_PENDING)
        self.persisted: set[int] = set()  # the bitmap as on stable storage
        self.after_persist: list[Ready[Op, Op]] = []
        self.source = [0] * REGIONS  # what the application wrote (its writes issued)
        self.disk = [0] * REGIONS  # what a read of the source volume returns
        self.landing: list[Op] = []  # issued writes not yet on the source volume, in order
        self.flushes: list[Op] = []  # issued, not yet released
        self.volatile = [0] * REGIONS
        self.durable = [0] * REGIONS
        self.target_generation = GENERATION
        self.target_up_to_date = True
        self.version = 0
        self.sequence = 0
        self.now = 0.0
        self.failing = False
        self.untracked = False  # Broken since the last full resync marked everything
        self.app_lane: list[tuple[Frame, Sent[Op, Op] | None]] = []
        self.resync_lane: list[tuple[Frame, Chunk | None]] = []
        self.wire: list[Frame] = []  # sent, not yet applied by the target
        self.acks: list[tuple[int, int]] = []  # (sequence, errno), in order
        self.failed: list[Frame] = []  # the target failed them; their ACKs are not back yet
        self.commit_flushes: set[int] = set()  # sequences of the resync's FLUSH frames
        self.ops: list[Op] = []
        self.mode = "sync"

    def new_engine(self, state: MirrorState) -> MirrorEngine[Op, Op]:
        engine = self.engine_class(
            self.bitmap, "beta:data1", errno.errorcode.__getitem__, state, self.generations,
            lambda: next(self.fresh), PEER_TIMEOUT,
        )  # fmt: skip
        engine.ledger = self.ledger_class(REGION)
        return engine

    # -- the adapter: carry out a Ready in the contract's order ---------------------------

    def apply(self, ready: Ready[Op, Op]) -> None:
        if ready.generations is not None:  # the log's header: persisted at once
            self.generations = ready.generations
        if ready.mark_all:
            self.bitmap.mark_all()
            self.persist()  # the contract: persisted before anything else of it
            self.untracked = False
        for offset, length in ready.mark:
            self.bitmap.mark(offset, length)
        for first, count in ready.clear:
            self.bitmap.clear_regions(first, count)
        for op in ready.unpin_now:
            op.pinned = False
        for op in ready.durable_now:
            op.target_durable = True
        if ready.durable_now:
            self.release_durable_flushes()
        if ready.waits_for_persist:
            self.after_persist.append(ready)
        if ready.send is not None:
            entry = ready.send
            op = entry.token
            kind = "flush" if entry.is_flush else "write"
            self.app_lane.append((Frame(0, kind, op.first, [op.version] * op.count), entry))
        for record in ready.records:
            frame = Frame(0, "record", record=record, generation=self.generations.current)
            self.resync_lane.append((frame, None))
        if ready.answer is not None and ready.answer[0] in self.commit_flushes:
            self.commit_flushes.discard(ready.answer[0])
            if not ready.answer[1]:
                self.apply(self.engine.resync_committed())
        if ready.close is not None:
            self.lose_link_now(crash=False)

    def lose_link_now(self, crash: bool) -> None:
        if not self.engine.link_up:
            return
        unsent = [entry for _, entry in self.app_lane if entry is not None]
        self.app_lane, self.resync_lane, self.wire, self.acks = [], [], [], []
        self.failed = []
        self.commit_flushes.clear()
        self.sequence = 0  # a new link numbers its frames from 1 again
        self.apply(self.engine.lost("link lost", unsent))
        if crash:
            self.volatile = list(self.durable)

    def connect(self) -> None:
        handshake = self.engine.handshake(self.now, self.target_generation, self.target_up_to_date)
        if handshake.mark_all:  # only a target of an unrelated generation needs everything
            assert self.target_generation not in (self.generations.current, GENERATION)
        self.apply(handshake)
        self.apply(self.engine.admitted(link_open=True))

    @initialize(created=st.booleans(), asynchronous=st.booleans())
    def start(self, created: bool, asynchronous: bool) -> None:
        """Either in sync from the start, or a job just created (the target holds another
        generation: the handshake marks every region and the full resync begins)."""
        self.mode = "async" if asynchronous else "sync"
        self.engine.configure(self.mode, QUEUE_LIMIT)
        if created:
            self.source = list(range(1, REGIONS + 1))
            self.disk = list(self.source)
            self.version = REGIONS
            self.target_generation, self.target_up_to_date = 0, False
        self.connect()
        assert self.engine.state is (MirrorState.RESYNCING if created else MirrorState.MIRRORING)

    # -- rules: the application -----------------------------------------------------------

    @rule(first=st.integers(0, REGIONS - 1), count=st.integers(1, 2), lands_now=st.booleans())
    def write(self, first: int, count: int, lands_now: bool) -> None:
        """A write is issued: shipped, and written locally -- at once (inline, while the
        volume's writer has nothing queued), or later, in order, by the writer thread."""
        count = min(count, REGIONS - first)
        self.version += 1
        op = Op("write", first, count, self.version, pinned=True)
        self.ops.append(op)
        for region in range(first, first + count):
            self.source[region] = self.version
        self.landing.append(op)
        self.apply(self.engine.ship(op, op, "write", first * REGION, count * REGION, 1))
        if lands_now and len(self.landing) == 1:
            self.a_local_write_lands()

    @precondition(lambda self: self.landing)
    @rule()
    def a_local_write_lands(self) -> None:
        op = self.landing.pop(0)
        for region in range(op.first, op.first + op.count):
            self.disk[region] = op.version
        self.release_durable_flushes()

    @rule()
    def flush(self) -> None:
        """A FLUSH: once it holds on the source volume (every write issued before it has
        landed) and on the target, the writes before it are released (``released``)."""
        op = Op("flush", before=list(self.landing))
        self.flushes.append(op)
        self.apply(self.engine.ship(op, op, "flush", 0, 0, 0))

    def release_durable_flushes(self) -> None:
        for op in list(self.flushes):
            if op.target_durable and not any(w in self.landing for w in op.before):
                self.flushes.remove(op)
                if op.place is not None:
                    self.apply(self.engine.released(op.place))

    # -- rules: the sender, the target, the ACKs ------------------------------------------

    @precondition(lambda self: self.app_lane or self.resync_lane)
    @rule(app_first=st.booleans())
    def send(self, app_first: bool) -> None:
        if (app_first and self.app_lane) or not self.resync_lane:
            frame, entry = self.app_lane.pop(0)
            frame.sequence = self.next_sequence()
            if entry is not None:
                place = self.engine.sent(entry, frame.sequence, self.now)
                if entry.is_flush:
                    entry.token.place = place
        else:
            frame, chunk = self.resync_lane.pop(0)
            frame.sequence = self.next_sequence()
            if chunk is not None:
                self.engine.ledger.chunk_frame_sent(chunk, frame.sequence)
            elif frame.kind == "flush":
                self.engine.ledger.ask(frame.sequence, "resync flush")
                self.commit_flushes.add(frame.sequence)
            else:
                self.engine.ledger.ask(frame.sequence, "record")
        self.wire.append(frame)

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    @precondition(lambda self: self.wire)
    @rule()
    def target_applies(self) -> None:
        frame = self.wire.pop(0)
        if self.failing or frame.fails:
            self.acks.append((frame.sequence, errno.EIO))
            self.failed.append(frame)
            return
        if frame.kind in ("write", "resync"):
            for i, version in enumerate(frame.versions):
                self.volatile[frame.first + i] = version
        elif frame.kind == "flush":
            self.durable = list(self.volatile)
        elif frame.record is pw.DataState.INCONSISTENT:
            self.target_generation, self.target_up_to_date = frame.generation, False
        self.acks.append((frame.sequence, 0))

    @precondition(lambda self: self.acks)
    @rule()
    def deliver_ack(self) -> None:
        sequence, code = self.acks.pop(0)
        self.failed = [frame for frame in self.failed if frame.sequence != sequence]
        self.now += 0.001
        self.apply(self.engine.ack(sequence, code, self.now))

    @rule(app_first=st.booleans(), commit=st.booleans())
    def run_until_idle(self, app_first: bool, commit: bool) -> None:
        """Big steps: maybe commit the resync's open batch, send everything, the target
        applies it all, every ACK comes back."""
        if commit and self.may_commit():
            self.commit()
        while self.engine.link_up and (self.app_lane or self.resync_lane or self.wire or self.acks):
            if self.app_lane or self.resync_lane:
                self.send(app_first)
            elif self.wire:
                self.target_applies()
            else:
                self.deliver_ack()

    @rule()
    def persist(self) -> None:
        self.persisted = {r for r in range(REGIONS) if self.bitmap.is_marked(r)}
        waiting, self.after_persist = self.after_persist, []
        for ready in waiting:
            for op in ready.unpin_after_persist:
                op.pinned = False
            for op in ready.durable_after_persist:
                op.target_durable = True
        self.release_durable_flushes()

    @rule(how=st.sampled_from(["link lost", "target crashed", "target silent", "source crashed"]))
    def something_fails(self, how: str) -> None:
        """The link goes (and the target's volatile copy with it, on a crash); or the target
        falls silent and the engine's liveness check drops it; or the source restarts."""
        if how == "target silent" and self.engine.link_up:
            # Not dropped before peer_timeout: from the last word heard, or from the oldest
            # frame an application waits on, if that is older (its ACK never came).
            owed = self.engine.ledger.oldest_owed()
            since = min(self.engine.last_heard, self.engine.last_heard if owed is None else owed)
            assert self.engine.idle(since + PEER_TIMEOUT) is None
            silent = self.engine.idle(self.engine.last_heard + PEER_TIMEOUT + 0.1)
            assert silent is not None and "silent" in silent.message
        if how == "source crashed":
            self.source_restarts()
        else:
            self.lose_link_now(crash=how == "target crashed")

    @rule()
    def disk_fails_or_heals(self) -> None:
        self.failing = not self.failing

    def frames(self) -> list[Frame]:
        """Every frame not yet applied: queued in a lane or on the wire."""
        return [frame for frame, _ in (*self.app_lane, *self.resync_lane)] + self.wire

    @precondition(frames)
    @rule(pick=st.integers(0, 7))
    def a_frame_will_fail(self, pick: int) -> None:
        """The target's disk will fail the frame ``pick`` not yet applied (a write, resync
        data, a FLUSH, a record), and only that one."""
        frames = self.frames()
        frames[pick % len(frames)].fails = True

    @precondition(lambda self: not self.engine.link_up and self.engine.wants_link)
    @rule()
    def reconnect(self) -> None:
        self.connect()

    def source_restarts(self) -> None:
        """The source node crashes and comes back: the intent log as persisted, plus the
        hot extents of the activity log (every op still pinned), marked at open."""
        self.lose_link_now(crash=False)
        self.landing = []  # never written locally, so never acknowledged: lost
        self.flushes = []
        self.source = list(self.disk)
        self.bitmap = DirtyBitmap(REGIONS * REGION, REGION)
        for region in self.persisted:
            self.bitmap.mark(region * REGION, REGION)
        for op in self.ops:
            if op.pinned:
                self.bitmap.mark(op.first * REGION, op.count * REGION)
                op.pinned = False
        self.persisted = {r for r in range(REGIONS) if self.bitmap.is_marked(r)}
        self.after_persist = []
        state = MirrorState.BROKEN if self.untracked else MirrorState.RESYNC_PENDING
        if self.engine.state is MirrorState.PAUSED:  # the job record keeps both
            state = MirrorState.PAUSED
        self.engine = self.new_engine(state)
        self.engine.configure(self.mode, QUEUE_LIMIT)

    # -- rules: the administrator ---------------------------------------------------------

    def command(self, command: Callable[[], Ready[Op, Op]]) -> None:
        """An administrator's command; one the state table refuses changes nothing."""
        before = (self.engine.state, self.engine.checksum_next)
        try:
            ready = command()
        except IllegalTransition:
            assert (self.engine.state, self.engine.checksum_next) == before
            return
        self.apply(ready)

    @rule(what=st.sampled_from(["pause", "resume", "break", "full resync", "checksum resync"]))
    def administrator(self, what: str) -> None:
        engine = self.engine
        self.command(
            {
                "pause": engine.pause,
                "resume": engine.resume,
                "break": engine.break_,
                "full resync": engine.full_resync,
                "checksum resync": engine.checksum_resync,
            }[what]
        )
        if what == "break":
            self.untracked = True

    # -- rules: the resync ----------------------------------------------------------------

    @precondition(lambda self: self.engine.walking and self.bitmap.marked_count)
    @rule(
        data=st.data(),
        fails=st.sampled_from([False, False, False, True]),
        near_a_landing_write=st.booleans(),
    )
    def resync_chunk(self, data: Any, fails: bool, near_a_landing_write: bool) -> None:
        """Read a marked run and queue its RESYNC_DATA (which the target's disk may fail);
        often one that a write not yet on the source volume overlaps (the read misses it)."""
        runs = list(self.bitmap.runs(0, 2))
        if near_a_landing_write:
            raced = [
                (first, count)
                for first, count in runs
                if any(op.first < first + count and first < op.first + op.count
                       for op in self.landing)
            ]  # fmt: skip
            runs = raced or runs
        first, count = data.draw(st.sampled_from(runs))
        ledger = self.engine.ledger
        racing = [(e.offset, e.length) for e in ledger.pending.values() if not e.is_flush]
        racing += [(e.offset, e.length) for _, e in self.app_lane if e and not e.is_flush]
        racing += [(op.first * REGION, op.count * REGION) for op in self.landing]
        span = Span(first, count, first * REGION, count * REGION)
        chunk = self.engine.resync_chunk(span, racing)  # issued, not complete: they race it
        ledger.chunk_frame(chunk)
        versions = self.disk[first : first + count]
        frame = Frame(0, "resync", first, list(versions), fails=fails)
        self.resync_lane.append((frame, chunk))

    def may_commit(self) -> bool:
        ledger = self.engine.ledger
        return self.engine.walking and bool(ledger.open_chunks) and not ledger.committing

    @precondition(may_commit)
    @rule()
    def commit(self) -> None:
        assert self.engine.ledger.commit()
        self.resync_lane.append((Frame(0, "flush"), None))

    @precondition(lambda self: self.engine.resync_complete)
    @rule()
    def resync_finishes(self) -> None:
        """The engine says the walk may end: the target records UpToDate (its ACK is awaited:
        here, delivered at once), then the engine is told."""
        self.target_up_to_date, self.target_generation = True, self.generations.current
        self.apply(self.engine.resync_finished())
        assert self.engine.state is MirrorState.MIRRORING and not self.engine.last_error

    # -- invariants -----------------------------------------------------------------------

    def covered(self, region: int) -> bool:
        """A write the ledger would mark if the link went now covers ``region``."""
        ledger = self.engine.ledger
        spans = [(e.offset, e.length) for e in ledger.pending.values() if not e.is_flush]
        spans += [(e.offset, e.length) for _, e in self.app_lane if e and not e.is_flush]
        spans += [(offset, length) for _, offset, length, _ in ledger.undurable]
        return any(offset <= region * REGION < offset + length for offset, length in spans)

    def pinned(self, region: int) -> bool:
        return any(op.pinned and op.first <= region < op.first + op.count for op in self.ops)

    @invariant()
    def intent_before_data(self) -> None:
        if self.untracked:
            return
        for region in range(REGIONS):
            if self.durable[region] != self.source[region]:
                assert region in self.persisted or self.pinned(region), (
                    f"region {region}: durable target copy differs, neither persisted as "
                    "marked nor pinned"
                )

    @invariant()
    def nothing_cleared_unproven(self) -> None:
        if self.untracked:
            return
        for region in range(REGIONS):
            if self.source[region] not in (self.volatile[region], self.durable[region]) or (
                self.volatile[region] != self.durable[region]
            ):
                assert self.bitmap.is_marked(region) or self.covered(region), (
                    f"region {region}: the target's copy differs, or would after a crash; "
                    "not marked, and no write in flight covers it"
                )

    def on_its_way(self, region: int) -> bool:
        """A write to ``region`` has not reached the target's copy yet: it is queued, on the
        wire, or failed there with its (error) ACK not back yet."""
        frames = [frame for frame, _ in self.app_lane] + self.wire + self.failed
        return any(
            frame.kind == "write" and frame.first <= region < frame.first + len(frame.versions)
            for frame in frames
        )

    @invariant()
    def nothing_applied_is_undone(self) -> None:
        """While the link is up, the target's copy differs from the source only where it is
        marked or a write is still on its way: resync data older than a write the target
        already applied (a chunk read while the write was in flight) may not be cleared."""
        if self.untracked or not self.engine.link_up:
            return
        for region in range(REGIONS):
            if self.volatile[region] != self.source[region]:
                assert self.bitmap.is_marked(region) or self.on_its_way(region), (
                    f"region {region}: the target's copy differs, not marked, and no write to "
                    "it is on its way"
                )

    @invariant()
    def never_up_to_date_while_different(self) -> None:
        if self.engine.state is not MirrorState.MIRRORING:
            return
        assert self.engine.link_up, "Mirroring without a link"
        for region in range(REGIONS):
            if self.volatile[region] != self.source[region]:
                assert self.covered(region), f"Mirroring while region {region} differs"


EngineMachine.TestCase.settings = settings(max_examples=2000, stateful_step_count=40, deadline=None)
TestEngine = EngineMachine.TestCase


# -- seeded bugs: the machine must find each ----------------------------------------------


class IgnoresFailedChunks(Ledger[Op, Op]):
    """An error ACK of resync data is taken as success (issue 10's defect)."""

    def ack(self, sequence: int, errno: int, now: float) -> Ready[Op, Op]:
        if sequence in self._chunk_frames:
            errno = 0
        return super().ack(sequence, errno, now)


class ForgetsUndurableWrites(Ledger[Op, Op]):
    """A lost link marks the writes in flight but forgets those ACKed and not yet made
    durable by a FLUSH (a target crash then loses them unmarked)."""

    def lost(self, unsent: list[Sent[Op, Op]]) -> Ready[Op, Op]:
        self.undurable = []
        return super().lost(unsent)


class MarksNothingKept(Ledger[Op, Op]):
    """A write kept while the target is away (or the queue is full) is not marked."""

    def kept(self, token: Op, pin: Op, offset: int, length: int, is_flush: bool) -> Ready[Op, Op]:
        ready = super().kept(token, pin, offset, length, is_flush)
        return Ready(unpin_now=list(ready.unpin_after_persist), changes=ready.changes)


class ClearsBeforeTheFlush(Ledger[Op, Op]):
    """A resync chunk is cleared as soon as its data is ACKed, before the FLUSH that makes
    it durable (a target crash then loses it unmarked)."""

    def ack(self, sequence: int, errno: int, now: float) -> Ready[Op, Op]:
        chunk = self._chunk_frames.get(sequence)
        ready = super().ack(sequence, errno, now)
        if chunk is not None and not errno:
            return Ready(clear=[(chunk.first, chunk.count)])
        return ready


class AdmitsWhatIsMarked(MirrorEngine[Op, Op]):
    """The handshake admits a target that says UpToDate although regions are marked."""

    def handshake(self, now: float, target_generation: int, up_to_date: bool) -> Ready[Op, Op]:
        marked, self.bitmap = self.bitmap, DirtyBitmap(REGIONS * REGION, REGION)
        try:
            return super().handshake(now, target_generation, up_to_date)
        finally:
            self.bitmap = marked


class IgnoresRacingWrites(MirrorEngine[Op, Op]):
    """A resync chunk read while a write to it is in flight is cleared all the same (the
    write may reach the target before the older data the chunk read)."""

    def resync_chunk(self, span: Span, racing: Iterable[tuple[int, int]]) -> Chunk:
        return super().resync_chunk(span, ())


def _machine(name: str, **classes: type[Any]) -> type[EngineMachine]:
    return type(name, (EngineMachine,), classes)


SEEDED = [
    _machine("IgnoresFailedChunksMachine", ledger_class=IgnoresFailedChunks),
    _machine("ForgetsUndurableWritesMachine", ledger_class=ForgetsUndurableWrites),
    _machine("MarksNothingKeptMachine", ledger_class=MarksNothingKept),
    _machine("ClearsBeforeTheFlushMachine", ledger_class=ClearsBeforeTheFlush),
    _machine("AdmitsWhatIsMarkedMachine", engine_class=AdmitsWhatIsMarked),
    _machine("IgnoresRacingWritesMachine", engine_class=IgnoresRacingWrites),
]


@pytest.mark.skipif(
    _compiled.ACTIVE,
    reason="a seeded bug subclasses the engine or the ledger, which Python "
    "cannot do to a compiled class; make test runs these with the pure modules",
)
@pytest.mark.parametrize("machine", SEEDED, ids=lambda machine: machine.__name__)
def test_the_machine_catches_a_seeded_bug(machine: type[EngineMachine]) -> None:
    quick = settings(
        max_examples=3000, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.generate],  # no shrinking
        derandomize=True,  # the same examples every run: a catch never depends on luck
    )  # fmt: skip
    try:
        run_state_machine_as_test(machine, settings=quick)
    except AssertionError:
        return
    except BaseExceptionGroup as group:  # several distinct failures found
        assert group.subgroup(AssertionError) is not None, group
        return
    pytest.fail(f"{machine.__name__}: the seeded bug went unnoticed")


# -- regressions ----------------------------------------------------------------------------


def test_a_flush_of_an_earlier_link_releases_nothing_on_the_next() -> None:
    """Sequence numbers start again at 1 on every link.  A FLUSH ACKed on one link whose local
    half completes only after the next link is up must not release that link's writes: they
    are ACKed but not durable on the target, and releasing them would drop them from what a
    target crash marks (found while modelling releases in the machine above)."""
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    engine: MirrorEngine[Op, Op] = MirrorEngine(bitmap, "beta:data1", str, MirrorState.MIRRORING)
    engine.link_up = True
    ops = [Op("write", region, 1, pinned=True) for region in range(4)]
    for sequence, op in enumerate(ops, start=1):
        entry = engine.ship(op, op, "write", op.first * REGION, REGION, 1).send
        assert entry is not None
        engine.sent(entry, sequence, 0.0)
        engine.ack(sequence, 0, 0.0)
    flush = Op("flush")
    flush_entry = engine.ship(flush, flush, "flush", 0, 0, 0).send
    assert flush_entry is not None
    place = engine.sent(flush_entry, 5, 0.0)
    assert engine.ack(5, 0, 0.0).durable_now == (flush,)  # durable on the target; not locally yet
    lost = engine.lost("link lost", [])
    assert sorted(lost.mark) == [(r * REGION, REGION) for r in range(4)]
    engine.handshake(1.0, 1, True)
    engine.admitted(link_open=True)  # Resyncing: the marks go first; writes flow meanwhile
    late = Op("write", 6, 1, pinned=True)
    late_entry = engine.ship(late, late, "write", 6 * REGION, REGION, 1).send
    assert late_entry is not None
    engine.sent(late_entry, 2, 1.0)  # sequence 2 of the new link (1 was its INCONSISTENT record)
    engine.ack(2, 0, 1.0)
    assert engine.released(place).unpin_now == ()  # the old link's flush proves nothing here
    assert [offset for _, offset, _, _ in engine.ledger.undurable] == [6 * REGION]
    assert engine.lost("link lost", []).mark == [(6 * REGION, REGION)]


def test_a_failing_intent_log_breaks_the_mirror_and_outdates_the_target() -> None:
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    engine: MirrorEngine[Op, Op] = MirrorEngine(bitmap, "beta:data1", str, MirrorState.MIRRORING)
    engine.link_up = True
    failed = engine.intent_log_failed()
    assert failed.changes == ((MirrorState.MIRRORING, MirrorEvent.BREAK),)
    assert failed.close is not None and failed.close.record is pw.DataState.OUTDATED
    assert "the intent log cannot be written" in engine.last_error
    assert engine.intent_log_failed() == Ready()  # once: a Broken mirror has nothing more to say
    write = Op("write", 0, 1, pinned=True)
    untracked = engine.ship(write, write, "write", 0, REGION, 1)
    assert (untracked.send, untracked.mark, untracked.unpin_now) == (None, (), [write])


def test_writes_the_target_does_not_get_start_a_new_generation_once() -> None:
    """The first write marked with no link starts a new generation (persisted before it is
    answered); later ones stay in it until the target holds it.  The target, still at the
    one it grew from, gets a partial resync -- never a full one -- and holds the new one
    once that ends (core/lineage.py)."""
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    fresh = iter([21, 22])
    engine: MirrorEngine[Op, Op] = MirrorEngine(
        bitmap, "beta:data1", str, MirrorState.RESYNC_PENDING, Generations(11), lambda: next(fresh)
    )
    first, second = Op("write", 0, 1, pinned=True), Op("write", 1, 1, pinned=True)
    kept = engine.ship(first, first, "write", 0, REGION, 1)
    assert kept.generations == Generations(21, 11) and kept.reply == [first]
    assert engine.ship(second, second, "write", REGION, REGION, 1).generations is None
    for offset, length in (*kept.mark, (REGION, REGION)):
        bitmap.mark(offset, length)
    flush = Op("flush")
    assert engine.ship(flush, flush, "flush", 0, 0, 0).generations is None
    behind = engine.handshake(1.0, 11, True)  # the target holds the one ours grew from
    assert not behind.mark_all and behind.generations is None
    assert engine.admitted(link_open=True).start_resync
    assert engine.resync_finished().generations == Generations(21)
    engine.lost("link lost", [])
    again = engine.ship(first, first, "write", 0, REGION, 1)
    assert again.generations == Generations(22, 21)
    assert engine.handshake(2.0, 5, True).mark_all  # unrelated: everything differs


@pytest.mark.parametrize("peer_timeout", [1.0, 1.5, 3.0, 10.0, 600.0])
def test_a_silent_target_is_dropped_after_peer_timeout_and_not_before(peer_timeout: float) -> None:
    """The adapter ticks every ``ping_interval`` (4 per timeout, at most every 2 s) and asks
    ``idle``: a target that said nothing for ``peer_timeout`` is dropped at the first tick
    after that -- never before, and at most one interval later.  Anything heard (a PONG, an
    ACK) starts the count again."""
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    engine: MirrorEngine[Op, Op] = MirrorEngine(
        bitmap, "beta:data1", str, MirrorState.RESYNC_PENDING, peer_timeout=peer_timeout
    )
    tick = engine.ping_interval
    assert tick == min(MAX_PING_INTERVAL, peer_timeout / 4)
    engine.handshake(100.0, 1, True)
    assert engine.admitted(link_open=True).changes
    assert engine.idle(100.0 + peer_timeout) is None  # silent for exactly the timeout: kept
    heard_at = 100.0 + peer_timeout - tick / 3  # a PONG between two ticks
    engine.heard(heard_at)
    ticks = (100.0 + k * tick for k in itertools.count(1))
    dropped_at = next(t for t in ticks if engine.idle(t) is not None)
    assert peer_timeout < dropped_at - heard_at <= peer_timeout + tick
    silent = engine.idle(dropped_at)
    assert silent is not None
    assert silent.message == f"beta:data1 silent for {peer_timeout:g} s (peer_timeout)"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_target_that_answers_pings_but_acknowledges_nothing_is_dropped(mode: str) -> None:
    """Found by the nemesis: a target whose disk hangs still answers PINGs, so it was never
    silent and a synchronous write waited for its ACK for ever.  A frame an application waits
    on, unacknowledged for ``peer_timeout``, drops the link; an asynchronous frame (nobody
    waits on it) does not, or a slow link would be cut over and over."""
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    engine: MirrorEngine[Op, Op] = MirrorEngine(
        bitmap, "beta:data1", str, MirrorState.RESYNC_PENDING, peer_timeout=3.0
    )
    engine.configure(mode, 1 << 30)
    engine.handshake(100.0, 1, True)
    engine.admitted(link_open=True)
    write = Op("write", 0, 1, pinned=True)
    ready = engine.ship(write, write, "write", 0, REGION, REGION)
    assert ready.send is not None
    engine.sent(ready.send, 1, 100.0)
    for tick in (101.0, 102.0, 103.0):
        engine.heard(tick)  # PONGs keep coming
        assert engine.idle(tick) is None
    engine.heard(103.5)
    overdue = engine.idle(103.5)
    if mode == "async":
        assert overdue is None
    else:
        assert overdue is not None
        assert overdue.message == "beta:data1 acknowledged no write for 3 s (peer_timeout)"


def test_a_source_write_failing_while_a_resync_finishes_keeps_it_going() -> None:
    """Found by the nemesis (a soak run): the walk found nothing marked and asked the target
    to record UpToDate; a write the source's disk failed marked a region while it waited,
    and the mirror went Mirroring with that region marked and the copies different.  Now
    the target is told it is Inconsistent again and the walk is not complete."""
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    engine: MirrorEngine[Op, Op] = MirrorEngine(bitmap, "beta:data1", str)
    bitmap.mark(0, REGION)
    engine.handshake(1.0, 1, True)
    assert engine.admitted(link_open=True).start_resync
    bitmap.clear_regions(0, 1)  # the walk resent and committed it
    assert engine.resync_complete
    engine.finishing = True  # Resync._finish: UP_TO_DATE is on its way
    failed = engine.source_write_failed(range(0), 3 * REGION, REGION, "Input/output error")
    for offset, length in failed.mark:
        bitmap.mark(offset, length)
    assert failed.records == (pw.DataState.INCONSISTENT,) and not failed.start_resync
    assert engine.state is MirrorState.RESYNCING and not engine.resync_complete
    assert "source's disk failed a write" in engine.last_error
    again = engine.source_write_failed(range(0), 4 * REGION, REGION, "Input/output error")
    assert again.records == ()  # told once; the walk goes on and records UpToDate when done
    mirroring = MirrorEngine[Op, Op](DirtyBitmap(REGIONS * REGION, REGION), "beta:data1", str)
    mirroring.handshake(1.0, 1, True)
    mirroring.admitted(link_open=True)
    assert mirroring.state is MirrorState.MIRRORING
    marked = mirroring.source_write_failed(range(0), 0, REGION, "Input/output error")
    assert marked.changes == ((MirrorState.MIRRORING, MirrorEvent.SOURCE_WRITE_FAILED),)
    assert marked.start_resync and marked.records == (pw.DataState.INCONSISTENT,)
    assert list(marked.mark) == [(0, REGION)] and list(marked.unpin_after_persist) == [range(0)]
