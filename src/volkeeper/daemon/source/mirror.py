"""The source end of one mirror: ship writes to the target, keep the intent log, resync.

How this works (docs/mirroring.md has the reasoning): a ``Mirror`` owns the link to its
target, the mirror's intent log (``IntentStore``: bitmap + activity log) and its state
(core/mirror_state.py).  ``run()`` keeps a link up: connect, HELLO, and on HELLO_OK decide
between a partial resync (same generation: the bitmap says what differs) and a full one
(anything else), then stream the marked regions (daemon/source/resync.py) while application writes
keep flowing; on loss it marks what the target may lack and reconnects with backoff.

Application writes reach ``ship(op)`` through ``Replication``
(daemon/source/replication.py), already ordered and with their activity-log extents durably
active.  What ``ship`` does (the choice is core/mirror_state.py's ``route``; what follows a
write not sent, the ledger's ``kept`` and ``untracked``):

    link up (Mirroring, Resyncing)   send the frame.  sync: the op's reply waits for the ACK;
                                     async: it does not, but the bytes sent and not yet ACKed
                                     (the queue) may not pass ``queue_limit``: an op that
                                     would is marked instead and the mirror resyncs
    link down (Resync pending,       mark the range in the bitmap; the reply need not wait
      Paused)                        (the op's activity-log extent is durably active), the
                                     extent is unpinned once the bitmap page is durable
    Broken                           nothing is tracked

What each frame's fate means is decided by the mirror's ``Ledger`` (core/mirror_ledger.py,
sans-IO): this adapter feeds it what was sent and what the target answered, and carries out
the ``Ready`` effects it returns, in their order (``_apply``).  ACKed writes stay pinned in
the activity log until a FLUSH has made them durable on both sides (``release_durable``);
when the link drops, every write not known durable on the target is marked and persisted
first, then unpinned.

A frame counts as applied only when its own ACK says so.  An ACK carrying an errno -- for any
frame: a write, resync data, zero, trim, flush, a STATE or JOB record, a hash request -- is a
*target failure* (``_target_failed``): the link is closed at once, so everything not proven
durable there stays marked (the resync clears nothing of that batch), the mirror falls back to
Resync pending with the target's reason in ``last_error`` (kept until a resync completes with
every frame ACKed), the failure is counted and published, and reconnection backs off longer
(``TARGET_ERROR_BACKOFF``) while the administrator frees space or replaces the disk.  The
application never sees it: its writes are tracked, as when the link is lost.

Metadata I/O (snapshots, bitmap pages) runs on this mirror's own thread
(daemon/source/intent_writer.py).  Administrator commands (pause, resume, break, resync) move the
state through the same table as the engine's own events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from volkeeper.core.mirror_ledger import Ledger, Ready, Sent
from volkeeper.core.mirror_state import (
    SENDING,
    MirrorEvent,
    MirrorState,
    Route,
    admission,
    next_state,
    route,
)
from volkeeper.core.peer import wire as pw
from volkeeper.core.stats import RateMeter
from volkeeper.daemon.source.compare import Comparer
from volkeeper.daemon.source.intent_writer import IntentWriter
from volkeeper.daemon.source.mirror_spec import MirrorSpec, hello_for, send_settings
from volkeeper.daemon.source.op import Op, frame_of
from volkeeper.daemon.source.peer_session import open_session
from volkeeper.daemon.source.resync import Resync
from volkeeper.daemon.source.sender import Sender
from volkeeper.daemon.source.verify import Verify, VerifyResult
from volkeeper.errors import PeerError
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.mirror")

PING_INTERVAL = 2.0  # an idle link is pinged this often
TARGET_TIMEOUT = 10.0  # a target that says nothing this long is lost
BACKOFF = (0.2, 0.5, 1.0, 2.0)  # seconds between attempts; the last one repeats
TARGET_ERROR_BACKOFF = (1.0, 2.0, 5.0, 10.0)  # the same, after the target failed a frame


class Mirror:
    def __init__(
        self,
        spec: MirrorSpec,
        node: str,
        service: VolumeService,
        store: IntentStore,
        readers: IoWorkers,
        compressors: IoWorkers,
        tls: ssl.SSLContext | None = None,
        state: MirrorState = MirrorState.RESYNC_PENDING,
    ) -> None:
        self.spec = spec
        self.node = node
        self.service = service
        self.store = store
        self.readers = readers
        self.compressors = compressors
        self.tls = tls
        self.state = state
        self.asynchronous = spec.settings.mode == "async"
        self.link: PeerLink | None = None
        self.sender: Sender | None = None  # the link's ordered, compressed, throttled way out
        self._earlier_wire_bytes = 0  # of links before this one
        self.resync: Resync | None = None
        self.checksum_next = False  # the next resync compares before it sends
        self.verify: Verify | None = None  # running
        self.verified: VerifyResult | None = None  # the last verify's result
        self.last_error = ""
        self.sent_bytes = 0  # write and resync payload bytes shipped
        self.ledger: Ledger[Op, range] = Ledger(store.bitmap.region_size)
        self.comparer = Comparer(self.ledger, service, readers)  # region digests of both sides
        self.overflows = 0  # async ops marked because the queue was full
        self.throughput = RateMeter()  # of sent_bytes
        self.on_state: Callable[[Mirror, MirrorState, MirrorEvent], None] = _no_callback
        self.on_target_error: Callable[[Mirror, str], None] = _no_error_callback
        # What stands as the last error until a resync ends without one: the target's last
        # failure, or damage found in the intent log when it was opened.
        self.standing_error = ""
        self.target_errors = 0  # error ACKs received, ever
        self._failures_in_a_row = 0  # links ended by a target failure since the last success
        self.job_document: Callable[[], str] = str  # the job record sent to the target
        self.intent = IntentWriter(store, f"{spec.job} -> {spec.target}", self._break)
        self._stopping = False
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._resync_task: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        self._clock: Callable[[], float] = lambda: 0.0
        # Ops issued but not complete (set by Replication): a resync read racing one of them
        # may have seen the disk before that write reached it.
        self.in_flight_ops: Callable[[], Iterable[Op]] = tuple

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the target connected until ``stop()``; never raises."""
        self._clock = asyncio.get_running_loop().time
        attempt = 0
        while not self._stopping:
            if self.state in (MirrorState.PAUSED, MirrorState.BROKEN):
                await self._sleep(None)
                continue
            try:
                await self._connect_and_serve()
                attempt = 0
            except (PeerError, TimeoutError) as exc:
                self._note(str(exc))
                log.info("mirror target unreachable", job=self.spec.job, why=str(exc))
            except Exception as exc:  # a bug: say so, drop the link, keep the mirror alive
                self._note(f"internal error: {exc!r}")
                log.exception("mirror connection failed", job=self.spec.job)
                if self.link is not None:
                    self.link.close(self.last_error)
            await self._sleep(self._backoff(attempt))
            attempt += 1

    def _note(self, error: str) -> None:
        """``error`` is the last error; one that stands until a resync is not hidden by it."""
        standing = self.standing_error
        self.last_error = f"{error}; {standing}" if standing and standing not in error else error

    def _backoff(self, attempt: int) -> float:
        if self._failures_in_a_row:
            steps = TARGET_ERROR_BACKOFF
            return steps[min(self._failures_in_a_row - 1, len(steps) - 1)]
        return BACKOFF[min(attempt, len(BACKOFF) - 1)]

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep, cut short by an administrator's command."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def stop(self, goodbye: pw.GoodbyeReason | None = None) -> None:
        self._stopping = True
        self._wake.set()
        link = self.link  # the target may close it while we wait: keep our own reference
        if link is not None and link.is_open:
            if goodbye is not None:
                link.send(pw.Goodbye(goodbye, f"job {self.spec.job}"))
                await asyncio.sleep(0.05)
            link.close("mirror stopping")

    def close(self) -> None:
        """After ``stop``: persist the intent log and close it cleanly."""
        self.intent.close()

    # -- connection -------------------------------------------------------------------------

    async def _connect_and_serve(self) -> None:
        self._lost.clear()
        hello = hello_for(self.spec, self.node, self.service, self.store.generations)
        link, answer = await open_session(
            self.spec.target_address, hello, self._on_frame, self._on_lost,
            tls=self.tls, peer_name=self.spec.target_node,
        )  # fmt: skip
        self._last_heard = self._clock()
        self.link = link
        self.sender = Sender(link, self.compressors, send_settings(self.spec.settings))
        if not link.is_open:  # lost before it was ours: _on_lost ignored it
            raise PeerError("link lost during the handshake")
        await self._admitted(link, answer)
        await self._watch(link)

    async def _watch(self, link: PeerLink) -> None:
        """PING an idle target; a target silent for TARGET_TIMEOUT is treated as lost, so a
        hung peer cannot hold synchronous writes forever (they fall back to tracking)."""
        loop = asyncio.get_running_loop()
        token = 0
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), PING_INTERVAL)
            if self._lost.is_set() or not link.is_open:
                return
            if loop.time() - self._last_heard > TARGET_TIMEOUT:
                link.close(f"{self.spec.target} silent for {TARGET_TIMEOUT:.0f} s")
                return
            token += 1
            link.send(pw.Ping(token))
            self.throughput.sample(loop.time(), self.sent_bytes)

    async def _admitted(self, link: PeerLink, ok: pw.HelloOk) -> None:
        decided = admission(
            self.store.generations.current, ok.current_generation,
            ok.data_state == pw.DataState.UP_TO_DATE, bool(self.store.bitmap.marked_count),
        )  # fmt: skip
        if decided.mark_all:
            log.info("target generation differs: full resync", job=self.spec.job)
            self.store.bitmap.mark_all()
            await self.intent.durable()
        if not link.is_open or self.state is not MirrorState.RESYNC_PENDING:
            link.close("mirror paused or broken during the handshake")
            return
        self.last_error = self.standing_error  # not cleared before a resync proves it gone
        self.announce()
        self._set(decided.event)
        if decided.event is MirrorEvent.CONNECTED_DIRTY:
            self._start_resync(link)

    def _on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        self._last_heard = self._clock()
        if isinstance(frame, pw.Ack):
            self._acked(link, frame)
        elif isinstance(frame, pw.Hashes):
            if not self.comparer.take(frame):
                link.close(f"HASHES for {frame.request}, which was not asked")
        elif isinstance(frame, pw.Goodbye) and frame.reason == pw.GoodbyeReason.SHUTDOWN:
            # A clean target stop: it made every write it ACKed durable before saying so.
            self._apply(self.ledger.target_shut_down_cleanly())
        elif not isinstance(frame, pw.Pong | pw.Goodbye):
            link.close(f"unexpected {frame.TYPE.name} frame from the target")

    def _on_lost(self, link: PeerLink, reason: str) -> None:
        if link is not self.link:
            return
        self.link = None
        self._note(reason)
        unsent = self._sender().abandon()
        self._earlier_wire_bytes += self._sender().wire_bytes
        self.sender = None
        if self.resync is not None:
            self.resync.lost(reason, unsent)
            self.resync = None
        self.comparer.lost(reason, unsent)
        if self.state in SENDING and not self._stopping:  # stopping is no "target lost"
            self._set(MirrorEvent.DISCONNECTED)
        self._apply(self.ledger.lost([entry for entry in unsent if isinstance(entry, Sent)]))
        self._lost.set()

    def _apply(self, ready: Ready[Op, range]) -> None:
        """Carry out the ledger's effects in the order its ``Ready`` prescribes."""
        bitmap = self.store.bitmap
        for offset, length in ready.mark:
            bitmap.mark(offset, length)
        for first, count in ready.clear:
            bitmap.clear_regions(first, count)
        for op in ready.release:
            op.release_payload()
        for op in ready.reply:
            op.part_done()
        for op in ready.durable_now:
            op.durable_done()
        activity_log = self.store.activity_log
        for extents in ready.unpin_now:
            activity_log.unpin(extents)
        if ready.waits_for_persist:
            unpin, durable = ready.unpin_after_persist, ready.durable_after_persist

            def persisted() -> None:
                for extents in unpin:
                    activity_log.unpin(extents)
                for flush in durable:
                    flush.durable_done()

            self.intent.after_durable(persisted)

    # -- application writes ---------------------------------------------------------------

    def ship(self, op: Op) -> None:
        """Carry ``op`` to the target, or mark it; pays ``op``'s reply part for this mirror."""
        link = self.link
        way = route(
            self.state, link is not None and link.is_open, self.asynchronous,
            self.ledger.queued_bytes, len(op.payload), op.is_flush,
            self.spec.settings.queue_limit,
        )  # fmt: skip
        if way is Route.SEND:
            self._send(op)
            return
        if way is Route.UNTRACKED:
            self._apply(self.ledger.untracked(op, op.extents, op.is_flush))
            return
        if way is Route.OVERFLOW and link is not None:
            self._overflow(link)
        self._apply(self.ledger.kept(op, op.extents, op.offset, op.length, op.is_flush))

    def _send(self, op: Op) -> None:
        owed = not self.asynchronous
        size = len(op.payload)
        entry = Sent(op, op.extents, op.command, op.offset, op.length, owed, size)
        self.ledger.queued(entry)
        self.sent_bytes += size
        if not op.is_flush:
            self.ledger.race(op.offset, op.length)
            if self.verify is not None:
                self.verify.note_race(op)
        if not owed:
            op.part_done()
        self._sender().send(frame_of(op), size, self._sent, entry)

    def _sent(self, entry: Sent[Op, range], sequence: int) -> None:
        """``entry``'s frame is on the link as ``sequence``."""
        op = entry.token
        if op.is_flush:
            if op.sequences is None:
                op.sequences = {}
            op.sequences[self.spec.target] = sequence
        if entry.owed:
            self._sender().link.push()
        self.ledger.sent(sequence, entry, self._clock())

    def _sender(self) -> Sender:
        assert self.sender is not None, "no link"
        return self.sender

    def _overflow(self, link: PeerLink) -> None:
        self.overflows += 1
        if self.state is MirrorState.MIRRORING:
            log.warning(
                "async queue full: tracking and resyncing",
                job=self.spec.job,
                queued_bytes=self.ledger.queued_bytes,
                limit=self.spec.settings.queue_limit,
            )
            self._set(MirrorEvent.QUEUE_OVERFLOW)
            self._start_resync(link)

    def _acked(self, link: PeerLink, ack: pw.Ack) -> None:
        """Let the ledger judge the ACK; an errno fails the target, whatever the frame was
        (the ledger has then marked everything in flight: the link goes)."""
        ready = self.ledger.ack(ack.sequence, ack.errno, self._clock())
        self._apply(ready)
        if ready.answer is not None:
            sequence, errno = ready.answer
            resync = self.resync
            if not (resync is not None and resync.answer(sequence, errno)) and errno:
                self.comparer.failed(sequence, errno)
        if ready.failure is not None:
            self._target_failed(link, *ready.failure)

    def _target_failed(self, link: PeerLink, errno: int, what: str) -> None:
        """The target could not apply a frame: say so everywhere, then drop the link, so
        every write and resync chunk not proven durable there stays marked."""
        why = os.strerror(errno)
        message = f"target {self.spec.target_node}: {self.spec.target_volume}: "
        message += f"{why[:1].lower()}{why[1:]} ({what})"
        self.standing_error = self.last_error = message
        self.target_errors += 1
        self._failures_in_a_row += 1
        log.error("target failed a frame", job=self.spec.job, target=self.spec.target,
                  error=message, errno=errno)  # fmt: skip
        self.on_target_error(self, message)
        link.close(message)

    def release_durable(self, op: Op) -> None:
        """``op`` (a flush) is durable locally and on the target: unpin what it covered."""
        sequence = op.sequences.get(self.spec.target) if op.sequences else None
        if sequence is not None:
            self._apply(self.ledger.released(sequence))

    @property
    def wire_bytes(self) -> int:
        """Payload bytes put on the wire (after compression), over every link so far."""
        return self._earlier_wire_bytes + (self.sender.wire_bytes if self.sender else 0)

    @property
    def undurable_writes(self) -> int:
        return len(self.ledger.undurable)

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest write sent and not yet ACKed (async mode's lag)."""
        pending = self.ledger.pending
        if not pending:
            return 0.0
        oldest = next(iter(pending.values()))
        return max(0.0, self._clock() - oldest.sent_at)

    # -- resync -------------------------------------------------------------------------------

    def _start_resync(self, link: PeerLink) -> None:
        """The target gets marked regions from now on: its copy is Inconsistent until done."""
        sender = self._sender()
        self.ask(pw.State(pw.DataState.INCONSISTENT, self.store.generations.current, 0))
        self.resync = Resync(self, link, sender, self.checksum_next)
        self._resync_task = asyncio.create_task(self.resync.run())
        self._resync_task.add_done_callback(lambda task: self._resync_ended(link, task))

    def _resync_ended(self, link: PeerLink, task: asyncio.Task[None]) -> None:
        """A resync that raised: its link goes (and, if it is gone already, _on_lost has
        moved the state), so the mirror reconnects instead of staying Resyncing."""
        if task.cancelled() or task.exception() is None or not link.is_open:
            return
        error = task.exception()
        log.error("resync failed", job=self.spec.job, error=repr(error))
        self._note(f"resync failed: {error}")
        link.close(self.last_error)

    def resync_finished(self, resync: Resync) -> None:
        """Every chunk ACKed, durable (FLUSH ACKed) and cleared; the target recorded
        UpToDate (its STATE ACKed): the only way to Mirroring from a resync."""
        self.resync = None
        self.checksum_next = False
        self.standing_error = self.last_error = ""
        self._failures_in_a_row = 0
        self._set(MirrorEvent.RESYNC_DONE)
        sent = resync.shipped_bytes if resync.checksum else resync.done_bytes
        log.info("resync finished", job=self.spec.job, target=self.spec.target,
                 bytes=resync.done_bytes, checksum=resync.checksum, sent_bytes=sent)  # fmt: skip

    # -- administrator commands ----------------------------------------------------------

    def pause(self) -> None:
        """Stop sending; keep marking.  Idempotent."""
        if self.state is not MirrorState.PAUSED:
            self._set(MirrorEvent.PAUSE)
            self._drop_link(pw.GoodbyeReason.PAUSED, "mirror paused by the administrator")

    def resume(self) -> None:
        """Continue a paused mirror: reconnect now, then resync what was marked."""
        if self.state in (MirrorState.PAUSED, MirrorState.BROKEN):
            self._set(MirrorEvent.CONTINUE)  # the table refuses it for Broken: --full only
        self._wake.set()

    def break_(self) -> None:
        """Stop tracking: the target's copy is Outdated until a full resync."""
        if self.state is MirrorState.BROKEN:
            return
        self._set(MirrorEvent.BREAK)
        link = self.link
        if link is not None and link.is_open:
            generations = self.store.generations
            link.send(pw.State(pw.DataState.OUTDATED, generations.current, generations.previous))
        self._drop_link(pw.GoodbyeReason.OTHER, "mirror broken by the administrator")

    async def full_resync(self) -> None:
        """Mark every region and resend it all (the only repair of a Broken mirror)."""
        self.store.bitmap.mark_all()
        await self.intent.durable()
        self._set(MirrorEvent.FULL_RESYNC)
        link = self.link
        if self.state is MirrorState.RESYNCING and self.resync is None and link is not None:
            self._start_resync(link)
        self._wake.set()

    async def checksum_resync(self) -> None:
        """Mark every region, then resync by comparing digests first: only regions that
        differ are sent.  A connected mirror reconnects to start it."""
        self.checksum_next = True
        self.store.bitmap.mark_all()
        await self.intent.durable()
        self._set(MirrorEvent.CHECKSUM_RESYNC)
        self.drop_link("checksum resync requested")
        self._wake.set()

    def start_verify(self, mark: bool) -> VerifyResult:
        """Compare source and target while mirroring goes on (see daemon/source/verify.py)."""
        sender = self.sender
        if self.verify is not None:
            return self.verify.result  # already running: idempotent
        if sender is None or self.state not in SENDING:
            raise PeerError(f"the mirror is {self.state.value}: verify needs a connected target")
        verify = self.verify = Verify(self, sender, mark)
        task = asyncio.ensure_future(verify.run())
        task.add_done_callback(self._verified)
        return verify.result

    def _verified(self, task: asyncio.Future[VerifyResult]) -> None:
        verify, self.verify = self.verify, None
        if verify is None:
            return
        self.verified = verify.result
        if task.cancelled() or task.exception() is not None:
            self.verified.error = self.verified.error or "verify stopped"
            return
        if verify.result.mark and verify.result.differing_bytes:
            self._set(MirrorEvent.VERIFY_MARKED)
            link = self.link
            if self.state is MirrorState.RESYNCING and self.resync is None and link is not None:
                self._start_resync(link)

    def configure(self, spec: MirrorSpec) -> None:
        """New settings (mode, queue limit, compression, throttle), live: ops already sent
        keep the terms they were sent on (a sync op still waits for its ACK)."""
        self.spec = spec
        self.asynchronous = spec.settings.mode == "async"
        if self.sender is not None:
            self.sender.configure(send_settings(spec.settings))

    def announce(self) -> None:
        """Send the job's record to the target (after HELLO_OK, and when the job changed)."""
        sender, document = self.sender, self.job_document()
        if sender is not None and sender.link.is_open and document:
            self.ask(pw.Job(document))

    def ask(self, frame: pw.State | pw.Job) -> None:
        """Send a record the target must store; its ACK is checked like a write's."""
        what = "job record" if isinstance(frame, pw.Job) else f"{frame.data_state.name} record"
        self._sender().send(frame, 0, self._asked, what)

    def _asked(self, what: str, sequence: int) -> None:
        self.ledger.ask(sequence, what)

    def drop_link(self, message: str) -> None:
        """Close the link (it reconnects, to the spec's address, after the backoff)."""
        link = self.link
        if link is not None and link.is_open:
            link.close(message)

    def _drop_link(self, reason: pw.GoodbyeReason, message: str) -> None:
        link = self.link
        if link is not None and link.is_open:
            link.send(pw.Goodbye(reason, message))
            link.close(message)

    # -- state ----------------------------------------------------------------------------

    def _set(self, event: MirrorEvent) -> None:
        before = self.state
        self.state = next_state(self.state, event)
        if self.state is not before:
            log.info(
                "mirror state",
                job=self.spec.job,
                target=self.spec.target,
                state=self.state.value,
                was=before.value,
                cause=event.value,
            )
            self.on_state(self, before, event)

    def _break(self) -> None:
        with contextlib.suppress(ValueError):
            self._set(MirrorEvent.BREAK)

    def view(self) -> dict[str, Any]:
        resync, now = self.resync, self._clock()
        verify = self.verify.result if self.verify is not None else self.verified
        rate = resync.rate(now) if resync is not None else 0.0
        self.throughput.sample(now, self.sent_bytes)
        done = resync.done_bytes if resync is not None else 0
        remaining = resync.remaining_bytes if resync is not None else 0
        activity_log = self.store.activity_log
        out_of_sync = self.store.bitmap.marked_bytes
        if self.state is MirrorState.BROKEN:  # untracked: all of it needs resending
            out_of_sync = self.service.volume.size
        return {
            "job": self.spec.job,
            "source": f"{self.node}:{self.spec.source_volume}",
            "target": self.spec.target,
            "role": "source",
            "mode": self.spec.settings.mode,
            "state": self.state.value,
            "out_of_sync_bytes": out_of_sync,
            "sent_bytes": self.sent_bytes,
            "wire_bytes": self.wire_bytes,
            "compression_ratio": _ratio(self.sent_bytes, self.wire_bytes),
            "queue_bytes": self.ledger.queued_bytes,
            "queue_limit_bytes": self.spec.settings.queue_limit if self.asynchronous else None,
            "lag_s": round(self.lag_seconds, 3),
            "throughput_bytes_per_s": round(self.throughput.rate(now, self.sent_bytes)),
            "compression": self.spec.settings.compression,
            "throttle": self.spec.settings.throttle,
            "resync_min": self.spec.settings.resync_min,
            "resync_max": self.spec.settings.resync_max,
            "resync": {
                "done_bytes": done,
                "total_bytes": done + remaining if resync is not None else 0,
                "rate_bytes_per_s": round(rate),
                "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            },
            "intent_log": {
                "region_bytes": self.store.bitmap.region_size,
                "hot_extents": len(activity_log.active_extents),
                "hot_extent_bytes": activity_log.extent_bytes,
                "crash_resync_bound_bytes": min(
                    activity_log.resync_bound_bytes, self.service.volume.size
                ),
            },
            "verify": verify.view() if verify is not None else None,
            "checksum_resync": self.checksum_next,
            "last_error": self.last_error or None,
            "target_errors": self.target_errors,
        }


def _ratio(before: int, after: int) -> float | None:
    return round(before / after, 2) if after else None


def _no_callback(mirror: Mirror, was: MirrorState, cause: MirrorEvent) -> None:
    return None


def _no_error_callback(mirror: Mirror, message: str) -> None:
    return None
