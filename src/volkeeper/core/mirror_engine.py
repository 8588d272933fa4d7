"""The source end of one mirror as a state machine: events in, one ordered batch of effects out.

How this works: a ``MirrorEngine`` holds everything the source decides about one mirror --
its state (the table in core/mirror_state.py), whether the link is up, the fate of every frame
sent (its ``Ledger``), whether a resync walk runs, the errors that stand until a resync ends,
and the backoff and liveness policy (a target silent for ``peer_timeout`` is dropped).  It
does no I/O and keeps no clock: the adapter (daemon/source/mirror.py) tells it what happened,
with the time where it matters, and carries out the ``Ready`` it gets back in the order
written on that class (core/ready.py).

    event                          method            what it may lead to
    application op                 ship              send it; or mark it (no link, paused,
                                                     async queue full -> resync); or drop it
    frame handed to the link       sent              (bookkeeping)
    ACK / other frame heard        ack / heard       reply, release, unpin; an errno fails
                                                     the target: mark, close, back off longer
    application op, no link        ship              ... and a new generation (core/lineage.py)
    HELLO_OK                       handshake         mark every region (an unrelated generation)
      ...its marks persisted       admitted          Mirroring, or INCONSISTENT + resync
    link lost                      lost              mark what the target may lack
    resync chunk read / committed  resync_chunk,     join the batch (raced by writes in
                                   resync_committed  flight); clear what the FLUSH proved
    resync walk may end            resync_complete   (nothing marked, no batch open)
    resync done                    resync_finished   Mirroring; standing errors cleared
    idle tick                      idle              ping, or drop a silent target
    the source's disk failed a     source_write_    mark its regions (the target may have it),
    shipped write                  failed            resync them
    administrator                  pause, resume, break_, full_resync, checksum_resync,
                                   verify_marked

The engine reads the bitmap (how much is marked) but never writes it: marks and clears are
effects, so the order of the contract holds for every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, NamedTuple

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.intent_log_format import Generations
from volkeeper.core.lineage import rotated
from volkeeper.core.mirror_ledger import Chunk, Ledger
from volkeeper.core.mirror_state import (
    SENDING,
    Admission,
    MirrorEvent,
    MirrorState,
    Route,
    admission,
    next_state,
    route,
)
from volkeeper.core.peer import wire as pw
from volkeeper.core.ready import Close, Pin, Ready, Sent, Token
from volkeeper.core.resync_plan import Span

DEFAULT_PEER_TIMEOUT = 10.0  # a target that says nothing this long is lost ([node] peer_timeout)
MAX_PING_INTERVAL = 2.0  # the most between two pings (4 per peer_timeout when it is under 8 s)
BACKOFF = (0.2, 0.5, 1.0, 2.0)  # seconds between attempts; the last one repeats
TARGET_ERROR_BACKOFF = (1.0, 2.0, 5.0, 10.0)  # the same, after the target failed a frame
SPLIT_BRAIN_RETRY = 2.0  # in a split brain: until the other side gives way (resolved there)

S, E = MirrorState, MirrorEvent


class Place(NamedTuple):
    """Where a frame went: its link (links lost before it) and its sequence number there."""

    link: int
    sequence: int


class MirrorEngine(Generic[Token, Pin]):
    def __init__(
        self,
        bitmap: DirtyBitmap,
        target: str,
        strerror: Callable[[int], str],
        state: MirrorState = MirrorState.RESYNC_PENDING,
        generations: Generations | None = None,
        new_generation: Callable[[], int] = lambda: 0,
        peer_timeout: float = DEFAULT_PEER_TIMEOUT,
    ) -> None:
        """``target``: "NODE:VOLUME", naming it in errors; ``strerror`` words an errno;
        ``generations``: the intent log's; ``new_generation`` draws a fresh random id;
        ``peer_timeout``: seconds the target may say nothing before it is dropped."""
        self.bitmap = bitmap
        self.generations = generations or Generations(1)
        self.new_generation = new_generation
        self.target = target
        self.strerror = strerror
        self.state = state
        self.ledger: Ledger[Token, Pin] = Ledger(bitmap.region_size)
        self.asynchronous = False
        self.queue_limit = 0
        self.link_up = False
        self.links = 0  # links lost so far: names the current one
        self.walking = False  # a resync walk runs on this link
        self.stopping = False  # a lost link is then no "target lost"
        self.checksum_next = False  # the next resync compares before it sends
        self.last_error = ""
        # What stands as the last error until a resync ends without one: the target's last
        # failure, or damage found in the intent log when it was opened.
        self.standing_error = ""
        self.target_errors = 0  # error ACKs received, ever
        self.failures_in_a_row = 0  # links ended by a target failure since the last success
        self.overflows = 0  # async ops marked because the queue was full
        self.last_heard = 0.0
        # the walk found nothing marked and asks the target to record UpToDate (Resync._finish);
        # a region marked meanwhile tells it Inconsistent again and the walk goes on
        self.finishing = False
        self.peer_timeout = peer_timeout
        # the adapter's idle tick: at least 4 pings before a silent target is dropped
        self.ping_interval = min(MAX_PING_INTERVAL, peer_timeout / 4)
        self._admission: Admission | None = None

    def configure(self, mode: str, queue_limit: int) -> None:
        """New terms for ops from now on; ops already sent keep theirs."""
        self.asynchronous = mode == "async"
        self.queue_limit = queue_limit

    # -- errors and policy ------------------------------------------------------------------

    def note(self, error: str) -> None:
        """``error`` is the last error; one that stands until a resync is not hidden by it."""
        standing = self.standing_error
        self.last_error = f"{error}; {standing}" if standing and standing not in error else error

    def stand(self, error: str) -> None:
        """``error`` stands as the last error until a resync completes."""
        self.standing_error = self.last_error = error

    def backoff(self, attempt: int) -> float:
        """Seconds before connection attempt ``attempt + 1``."""
        if self.state is S.SPLIT_BRAIN:  # asking whether the other side gave way
            return SPLIT_BRAIN_RETRY
        if self.failures_in_a_row:
            steps = TARGET_ERROR_BACKOFF
            return steps[min(self.failures_in_a_row - 1, len(steps) - 1)]
        return BACKOFF[min(attempt, len(BACKOFF) - 1)]

    @property
    def wants_link(self) -> bool:
        return not self.stopping and self.state not in (S.PAUSED, S.BROKEN)

    def heard(self, now: float) -> None:
        self.last_heard = now

    def idle(self, now: float) -> Close | None:
        """A ``ping_interval`` passed: the link to drop if the target said nothing for more
        than ``peer_timeout``, or has left a frame an application waits on (sync mode)
        unacknowledged that long -- a target whose disk hangs still answers PINGs -- else
        None: ping it.  Either way a synchronous write waits at most ``peer_timeout`` plus
        one interval for a target that stopped answering."""
        if now - self.last_heard > self.peer_timeout:
            return Close(f"{self.target} silent for {self.peer_timeout:g} s (peer_timeout)")
        oldest = self.ledger.oldest_owed()
        if oldest is not None and now - oldest > self.peer_timeout:
            return Close(
                f"{self.target} acknowledged no write for {self.peer_timeout:g} s (peer_timeout)"
            )
        return None

    # -- the link -----------------------------------------------------------------------------

    def handshake(self, now: float, target_generation: int, up_to_date: bool) -> Ready[Token, Pin]:
        """HELLO_OK: decide what the target needs (``admission``).  Every region is marked
        when it holds an unrelated generation; ``admitted`` follows once that is persisted.
        A target that holds the current generation confirms it."""
        self.last_heard = now
        self._admission = admission(
            self.generations, target_generation, up_to_date, bool(self.bitmap.marked_count)
        )
        ready: Ready[Token, Pin] = Ready(mark_all=self._admission.mark_all)
        if target_generation == self.generations.current:
            ready.generations = self._confirmed()
        return ready

    def _confirmed(self) -> Generations | None:
        """The target holds the current generation: the next write it does not get starts
        a new one (core/lineage.py); the new generations, if they change."""
        if not self.generations.previous:
            return None
        self.generations = Generations(self.generations.current)
        return self.generations

    def _rotated(self) -> Generations | None:
        """A write the target will not get: a new generation, unless one was started since
        the target last held the current one (it is behind by that one still)."""
        if self.generations.previous:
            return None
        self.generations = rotated(self.generations, self.new_generation())
        return self.generations

    def admitted(self, link_open: bool) -> Ready[Token, Pin]:
        """The handshake's marks are persisted: the link carries writes from now on."""
        decided, self._admission = self._admission, None
        if decided is None or not link_open or self.state is not S.RESYNC_PENDING:
            return Ready(close=Close("mirror paused or broken during the handshake"))
        self.link_up = True
        self.last_error = self.standing_error  # not cleared before a resync proves it gone
        ready: Ready[Token, Pin] = Ready(changes=self._set(decided.event))
        if decided.event is E.CONNECTED_DIRTY:
            self._start_resync(ready)
        return ready

    def lost(self, reason: str, unsent: list[Sent[Token, Pin]]) -> Ready[Token, Pin]:
        """The link is gone; ``unsent``: application frames the sender still held."""
        self.link_up = self.walking = False
        self.links += 1
        self.note(reason)
        ready = self.ledger.lost(unsent)
        if self.state in SENDING and not self.stopping:
            ready.changes = self._set(E.DISCONNECTED)
        return ready

    def stop(self) -> None:
        self.stopping = True

    # -- application ops ----------------------------------------------------------------------

    def ship(
        self, token: Token, pin: Pin, command: str, offset: int, length: int, size: int
    ) -> Ready[Token, Pin]:
        """Where an application op goes (``route``), and what follows."""
        is_flush = command == "flush"
        way = route(
            self.state, self.link_up, self.asynchronous, self.ledger.queued_bytes, size,
            is_flush, self.queue_limit,
        )  # fmt: skip
        if way is Route.SEND:
            owed = not self.asynchronous
            entry = Sent(token, pin, command, offset, length, owed, size)
            self.ledger.queued(entry)
            if not is_flush:
                self.ledger.race(offset, length)
            return Ready(reply=() if owed else (token,), send=entry)
        if way is Route.UNTRACKED:
            return self.ledger.untracked(token, pin, is_flush)
        ready = self.ledger.kept(token, pin, offset, length, is_flush)
        if not self.link_up and not is_flush:
            ready.generations = self._rotated()
        if way is Route.OVERFLOW:
            self.overflows += 1
            if self.state is S.MIRRORING:
                ready.changes = self._set(E.QUEUE_OVERFLOW)
                self._start_resync(ready)
        return ready

    def sent(self, entry: Sent[Token, Pin], sequence: int, now: float) -> Place:
        """``entry``'s frame left as ``sequence`` of the current link; returns its place,
        which ``released`` takes for a flush."""
        self.ledger.sent(sequence, entry, now)
        return Place(self.links, sequence)

    def ack(self, sequence: int, errno: int, now: float) -> Ready[Token, Pin]:
        """The target's ACK; an errno, whatever the frame, fails the target."""
        self.last_heard = now
        ready = self.ledger.ack(sequence, errno, now)
        if ready.failure is not None:
            error, what = ready.failure
            why, (node, _, volume) = self.strerror(error), self.target.partition(":")
            self.stand(f"target {node}: {volume}: {why[:1].lower()}{why[1:]} ({what})")
            self.target_errors += 1
            self.failures_in_a_row += 1
            ready.close = Close(self.last_error)
        return ready

    def released(self, flush: Place) -> Ready[Token, Pin]:
        """A FLUSH sent at ``flush`` is durable locally and on the target: the writes ACKed
        before it on that link are durable on both sides.  A flush of an earlier link proves
        nothing about this one's writes (its sequence numbers start again at 1; the earlier
        link's writes were marked when it was lost)."""
        if flush.link != self.links:
            return Ready()
        return self.ledger.released(flush.sequence)

    def target_shut_down_cleanly(self) -> Ready[Token, Pin]:
        return self.ledger.target_shut_down_cleanly()

    # -- resync -------------------------------------------------------------------------------

    def _start_resync(self, ready: Ready[Token, Pin]) -> None:
        """The target gets marked regions from now on: its copy is Inconsistent until done."""
        ready.records = (pw.DataState.INCONSISTENT,)
        ready.start_resync = self.walking = True
        self.finishing = False

    def resync_chunk(self, span: Span, racing: Iterable[tuple[int, int]]) -> Chunk:
        """``span`` is about to be read and sent: it joins the open batch.  ``racing``: the
        (offset, length) of application writes in flight, which the read may miss."""
        chunk = self.ledger.chunk(span.first, span.count, span.offset, span.length)
        for offset, length in racing:
            self.ledger.race(offset, length)
        return chunk

    def resync_committed(self) -> Ready[Token, Pin]:
        """The batch's FLUSH was ACKed without error: clear what it proved durable there.  A
        target that ACKed the FLUSH before the data it covers is dropped."""
        ready = self.ledger.committed()
        if ready.failure is not None:
            ready.close = Close(f"resync failed: {ready.failure[1]}")
        return ready

    @property
    def resync_complete(self) -> bool:
        """The walk may end (the target records UpToDate, then ``resync_finished``): nothing
        is marked, and no batch is open or committing."""
        ledger = self.ledger
        return (
            self.walking
            and self.state is S.RESYNCING
            and not self.bitmap.marked_count
            and not (ledger.open_chunks or ledger.committing)
        )

    def resync_finished(self) -> Ready[Token, Pin]:
        """Every chunk ACKed, durable and cleared, the target recorded UpToDate, and that
        persisted: the only way to Mirroring from a resync."""
        self.walking = self.checksum_next = self.finishing = False
        self.standing_error = self.last_error = ""
        self.failures_in_a_row = 0
        return Ready(changes=self._set(E.RESYNC_DONE), generations=self._confirmed())

    def split_brain(self, message: str) -> Ready[Token, Pin]:
        """The target is the job's source too, with writes of its own since the copies
        parted (core/lineage.py): keep marking, say so, and ask again now and then until it
        gives way (the administrator resolved it there) or this side is kept here."""
        self.stand(message)
        if self.state is not S.RESYNC_PENDING:
            return Ready()
        return Ready(changes=self._set(E.SPLIT_BRAIN_FOUND))

    def resolved(self) -> Ready[Token, Pin]:
        """The split brain is over (this side was kept, or the other gave way)."""
        if self.state is not S.SPLIT_BRAIN:
            return Ready()
        return Ready(changes=self._set(E.RESOLVED))

    # -- administrator commands ---------------------------------------------------------------

    def pause(self) -> Ready[Token, Pin]:
        """Stop sending; keep marking.  Idempotent."""
        if self.state is S.PAUSED:
            return Ready()
        close = Close("mirror paused by the administrator", pw.GoodbyeReason.PAUSED)
        return Ready(changes=self._set(E.PAUSE), close=close)

    def resume(self) -> Ready[Token, Pin]:
        """Continue a paused mirror (the table refuses it for Broken: a full resync only)."""
        if self.state in (S.PAUSED, S.BROKEN):
            return Ready(changes=self._set(E.CONTINUE))
        return Ready()

    def break_(self) -> Ready[Token, Pin]:
        """Stop tracking: the target's copy is Outdated until a full resync."""
        if self.state is S.BROKEN:
            return Ready()
        message, outdated = "mirror broken by the administrator", pw.DataState.OUTDATED
        close = Close(message, pw.GoodbyeReason.OTHER, outdated)
        return Ready(changes=self._set(E.BREAK), close=close)

    def full_resync(self) -> Ready[Token, Pin]:
        """Mark every region and resend it all (the only repair of a Broken mirror)."""
        ready: Ready[Token, Pin] = Ready(mark_all=True, changes=self._set(E.FULL_RESYNC))
        if self.state is S.RESYNCING and not self.walking and self.link_up:
            self._start_resync(ready)
        return ready

    def checksum_resync(self) -> Ready[Token, Pin]:
        """Mark every region, then resync comparing digests first; a connected mirror
        reconnects to start it."""
        changes = self._set(E.CHECKSUM_RESYNC)
        self.checksum_next = True
        return Ready(mark_all=True, changes=changes, close=Close("checksum resync requested"))

    def verify_marked(self) -> Ready[Token, Pin]:
        """A verify marked the regions it found different: resync them."""
        ready: Ready[Token, Pin] = Ready(changes=self._set(E.VERIFY_MARKED))
        self._resync_new_marks(ready)
        return ready

    def source_write_failed(
        self, pin: Pin, offset: int, length: int, why: str
    ) -> Ready[Token, Pin]:
        """The source's own disk failed a mutation this mirror shipped: the target may hold
        what the source does not.  Its regions are marked (``pin``, an extra pin of its
        extents, goes once the marks are persisted) and resynced, so the target gets the
        source's data back; the error stands until then."""
        if self.state is S.BROKEN:
            return Ready(unpin_now=[pin])
        self.stand(f"the source's disk failed a write ({why}): its regions are resynced")
        ready: Ready[Token, Pin] = Ready(
            mark=[(offset, length)], unpin_after_persist=[pin],
            changes=self._set(E.SOURCE_WRITE_FAILED),
        )  # fmt: skip
        self._resync_new_marks(ready)
        return ready

    def _resync_new_marks(self, ready: Ready[Token, Pin]) -> None:
        """Regions were marked while the mirror resyncs: start the walk if none runs, or, if
        the walk is asking the target to record UpToDate right now, tell it it is not (the
        walk goes on: ``Resync._finish`` looks again)."""
        if self.state is S.RESYNCING and self.link_up:
            if self.finishing:
                ready.records, self.finishing = (pw.DataState.INCONSISTENT,), False
            elif not self.walking:
                self._start_resync(ready)

    def intent_log_failed(self) -> Ready[Token, Pin]:
        """The intent log cannot be written: changes can no longer be tracked.  The mirror
        breaks, says why until a resync completes, and the target is told its copy is
        Outdated (no more writes reach it)."""
        if self.state is S.BROKEN:
            return Ready()
        message = "the intent log cannot be written: changes are not tracked"
        self.stand(f"{message}; a full resync repairs the mirror once the disk is fixed")
        close = Close(message, pw.GoodbyeReason.OTHER, pw.DataState.OUTDATED)
        return Ready(changes=self._set(E.BREAK), close=close)

    def _set(self, event: MirrorEvent) -> tuple[tuple[MirrorState, MirrorEvent], ...]:
        before = self.state
        self.state = next_state(before, event)
        return ((before, event),) if self.state is not before else ()
