"""What a mirror's source knows of the frames it sent: which are applied, durable, or lost.

How this works: one ``Ledger`` per mirror, held by its engine (core/mirror_engine.py), reset
when a link is lost; sans-IO (no clock, no socket, no file).  Three kinds of frames have an
open fate:

    application frames   WRITE / ZERO / TRIM / FLUSH carrying an op (the ``Token``), from
                         ``sent`` to their ACK; an ACKed write then stays *undurable* until
                         a FLUSH sent after it is durable on both sides (``released``) --
                         remembered by its range and its activity-log ``Pin`` only: the op
                         itself (its payload, its callbacks) is not kept alive that long
    resync chunks        a run of marked regions read and sent as one or more RESYNC_DATA
                         frames; grouped in a batch that a FLUSH commits (``commit`` /
                         ``committed``)
    questions            any other frame whose ACK matters (STATE and JOB records, the
                         resync's FLUSH, hash requests): ``ask`` names it

Every input returns one ``Ready`` (core/ready.py: the effects, and the order the adapter must
carry them out in).  The rules the ledger keeps, which the engine's property tests
(tests/core/test_mirror_engine.py) check against a model of the target's disk:

* an ACK with an errno, for any frame, fails the target: everything whose fate is open is
  marked (as if the link were lost) and ``Ready.failure`` says why, so the adapter drops the
  link;
* a resync chunk is cleared only by ``committed`` after the batch's FLUSH was ACKed without
  error, and only if every frame of the chunk was itself ACKed without error -- and then
  only its regions no application write raced (``race``: issued while the chunk was read
  or in flight); the raced ones stay marked for the next pass;
* a lost link marks every write not known durable on the target, and the extents of those
  writes are unpinned only after the marks are persisted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic

from volkeeper.core.ready import NOTHING, Pin, Ready, Sent, Token
from volkeeper.core.stats import OpStats
from volkeeper.core.units import format_size


@dataclass(slots=True)
class Chunk:
    """A run of regions a resync read and sent; cleared once durable on the target."""

    first: int  # first region
    count: int
    offset: int
    length: int
    raced: list[tuple[int, int]] = field(default_factory=list)  # (first, last) regions raced
    unacked: int = 0  # frames of it handed to the sender and not ACKed yet
    failed: bool = False  # the target answered one of its frames with an error


class Ledger(Generic[Token, Pin]):
    def __init__(self, region_size: int) -> None:
        self.region_size = region_size
        self.pending: dict[int, Sent[Token, Pin]] = {}  # sequence -> application frame
        # ACKed, not yet known durable on the target: (sequence, offset, length, pin)
        self.undurable: list[tuple[int, int, int, Pin]] = []
        self.queued_bytes = 0  # payload bytes of application frames sent, not ACKed
        self.ack_latency = OpStats()  # send -> ACK of application writes and flushes
        self._questions: dict[int, str] = {}  # sequence -> what was asked
        self._chunk_frames: dict[int, Chunk] = {}  # sequence of a RESYNC_DATA -> its chunk
        self.open_chunks: list[Chunk] = []  # read or sent since the last commit
        self.committing: list[Chunk] = []  # the batch whose FLUSH is not ACKed yet

    # -- application frames ---------------------------------------------------------------

    def sent(self, sequence: int, entry: Sent[Token, Pin], now: float) -> None:
        """``entry``'s frame left as ``sequence`` (it was counted by ``queued`` before)."""
        entry.sent_at = now
        self.pending[sequence] = entry

    def oldest_owed(self) -> float | None:
        """When the oldest frame an application still waits on (sync mode) was sent."""
        for entry in self.pending.values():  # in the order sent
            if entry.owed:
                return entry.sent_at
        return None

    def queued(self, entry: Sent[Token, Pin]) -> None:
        """``entry`` was handed to the sender (it may wait there before ``sent``)."""
        self.queued_bytes += entry.size

    def ack(self, sequence: int, errno: int, now: float) -> Ready[Token, Pin]:
        """The target's ACK of ``sequence``; an errno fails the target, whatever the frame."""
        if errno:
            what = self.describe(sequence)
            chunk = self._chunk_frames.get(sequence)
            if chunk is not None:
                chunk.failed = True
            asked = sequence in self._questions
            failed = self.lost([])
            failed.failure = (errno, what)
            failed.answer = (sequence, errno) if asked else None
            return failed
        entry = self.pending.pop(sequence, None)
        if entry is not None:
            self.queued_bytes -= entry.size
            self.ack_latency.observe(entry.size, now - entry.sent_at)
            token = entry.token
            reply = (token,) if entry.owed else ()
            if entry.command == "flush":
                return Ready(reply=reply, durable_now=(token,))
            self.undurable.append((sequence, entry.offset, entry.length, entry.pin))
            return Ready(release=(token,), reply=reply)
        chunk = self._chunk_frames.pop(sequence, None)
        if chunk is not None:
            chunk.unacked -= 1
            return NOTHING
        if self._questions.pop(sequence, None) is not None:
            return Ready(answer=(sequence, 0))
        return NOTHING

    def released(self, flush_sequence: int) -> Ready[Token, Pin]:
        """The FLUSH sent as ``flush_sequence`` is durable locally and on the target: the
        writes ACKed before it are durable on both sides."""
        unpin, keep = [], []
        for item in self.undurable:
            if item[0] < flush_sequence:
                unpin.append(item[3])
            else:
                keep.append(item)
        self.undurable = keep
        return Ready(unpin_now=unpin)

    def target_shut_down_cleanly(self) -> Ready[Token, Pin]:
        """GOODBYE(SHUTDOWN): the target made every write it ACKed durable first."""
        ready: Ready[Token, Pin] = Ready(unpin_now=[pin for _, _, _, pin in self.undurable])
        self.undurable = []
        return ready

    def lost(self, unsent: list[Sent[Token, Pin]]) -> Ready[Token, Pin]:
        """The link is gone (``unsent``: what the sender still held): mark every write not
        known durable there; replies owed are paid (the marks cover them); the extents are
        unpinned and the flushes count as durable only after the marks are persisted."""
        mark, reply, unpin, durable = [], [], [], []
        for entry in [*self.pending.values(), *unsent]:
            if entry.owed:
                reply.append(entry.token)
            if entry.is_flush:
                durable.append(entry.token)
            else:
                mark.append((entry.offset, entry.length))
                unpin.append(entry.pin)
        for _, offset, length, pin in self.undurable:
            mark.append((offset, length))
            unpin.append(pin)
        ready: Ready[Token, Pin] = Ready(
            mark=mark, reply=reply, unpin_after_persist=unpin, durable_after_persist=durable
        )
        self.pending.clear()
        self.undurable = []
        self.queued_bytes = 0
        self._questions.clear()
        self._chunk_frames.clear()
        self.open_chunks = []
        self.committing = []
        return ready

    # -- questions ------------------------------------------------------------------------

    def kept(
        self, token: Token, pin: Pin, offset: int, length: int, is_flush: bool
    ) -> Ready[Token, Pin]:
        """An application op not sent (no link, paused, async queue full): a write is
        marked, its reply may go (its extent is durably active), its pin goes once the mark
        is persisted; a FLUSH covers only marked writes: nothing to make durable."""
        if is_flush:
            return Ready(reply=[token], durable_now=[token])
        self.race(offset, length)
        return Ready(
            mark=[(offset, length)], release=[token], reply=[token], unpin_after_persist=[pin]
        )

    @staticmethod
    def untracked(token: Token, pin: Pin, is_flush: bool) -> Ready[Token, Pin]:
        """An application op of a Broken mirror: not tracked at all, done with at once."""
        if is_flush:
            return Ready(reply=[token], durable_now=[token])
        return Ready(release=[token], reply=[token], unpin_now=[pin])

    def ask(self, sequence: int, what: str) -> None:
        """The frame sent as ``sequence`` (``what``) must be ACKed, or answered, without
        error."""
        self._questions[sequence] = what

    def answered(self, sequence: int) -> bool:
        """A reply other than an ACK (HASHES) answered ``sequence``; False if not asked."""
        return self._questions.pop(sequence, None) is not None

    def describe(self, sequence: int) -> str:
        """What the frame ``sequence`` was, in words, for an error message."""
        entry = self.pending.get(sequence)
        if entry is not None:
            return "flush" if entry.is_flush else _span(entry.command, entry.offset, entry.length)
        chunk = self._chunk_frames.get(sequence)
        if chunk is not None:
            return _span("resync write", chunk.offset, chunk.length)
        return self._questions.get(sequence, f"frame {sequence}")

    # -- resync chunks --------------------------------------------------------------------

    def chunk(self, first: int, count: int, offset: int, length: int) -> Chunk:
        """A chunk about to be read: it joins the open batch."""
        chunk = Chunk(first, count, offset, length)
        self.open_chunks.append(chunk)
        return chunk

    def chunk_frame(self, chunk: Chunk) -> None:
        """One frame of ``chunk`` is handed to the sender."""
        chunk.unacked += 1

    def chunk_frame_sent(self, chunk: Chunk, sequence: int) -> None:
        self._chunk_frames[sequence] = chunk

    def race(self, offset: int, length: int) -> None:
        """An application write to this range is being issued: a chunk it overlaps may have
        been read without it, or its data may overtake the write's on the wire."""
        if not (self.open_chunks or self.committing):
            return
        first = offset // self.region_size
        last = (offset + max(length, 1) - 1) // self.region_size
        for chunk in (*self.open_chunks, *self.committing):
            if first < chunk.first + chunk.count and chunk.first <= last:
                chunk.raced.append(
                    (max(first, chunk.first), min(last, chunk.first + chunk.count - 1))
                )

    def commit(self) -> bool:
        """The open batch's FLUSH is about to be sent; False if there is nothing to commit.
        One batch commits at a time (the resync waits for the FLUSH's ACK)."""
        if self.committing:
            raise ValueError("a resync batch is already committing")
        self.committing, self.open_chunks = self.open_chunks, []
        return bool(self.committing)

    def committed(self) -> Ready[Token, Pin]:
        """The batch's FLUSH was ACKed without error: clear what is proven durable there.
        A chunk with a frame still unACKed means the target answered out of order: its
        failure says so (nothing is cleared)."""
        chunks, self.committing = self.committing, []
        if any(chunk.unacked for chunk in chunks):
            return Ready(failure=(0, "the target ACKed a FLUSH before the resync data it covers"))
        return Ready(clear=[run for c in chunks if not c.failed for run in _unraced(c)])


def _unraced(chunk: Chunk) -> list[tuple[int, int]]:
    """``chunk``'s regions no application write raced, as (first, count) runs: only the
    raced ones stay marked (a hot block under a busy writer costs its own region again, not
    its whole chunk -- or a resync under load would resend every chunk it reads)."""
    runs, at = [], chunk.first
    for first, last in sorted(chunk.raced):
        if first > at:
            runs.append((at, first - at))
        at = max(at, last + 1)
    if at < chunk.first + chunk.count:
        runs.append((at, chunk.first + chunk.count - at))
    return runs


def _span(what: str, offset: int, length: int) -> str:
    return f"{what} at {offset}, {format_size(length)}"
