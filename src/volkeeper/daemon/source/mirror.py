"""The source end of one mirror, as I/O: the asyncio adapter around its engine.

How this works: every decision about a mirror -- where a write goes, what an ACK, an error
ACK or a lost link means, what a handshake admits, what a command does -- is its
``MirrorEngine``'s (core/mirror_engine.py, sans-IO; docs/mirroring.md has the reasoning).  A
``Mirror`` does what the engine cannot: ``run()`` keeps a link to the target up (connect,
HELLO, backoff, PING), feeds the engine what happens (``ship`` for the application writes
``Replication`` hands it, in order, their activity-log extents durably active; every frame
from the target; a lost link; an administrator's command) and carries out the ``Ready`` each
call returns, in the order that class prescribes (``apply``; core/ready.py): marks and clears
in the bitmap, replies, unpins -- those that must wait until the marks are on stable storage
wait for the mirror's intent writer (daemon/source/intent_writer.py, its own thread) --
then state changes (logged and published), frames, starting the resync, and closing the link.
Its resync and verify run as tasks in ``Walks`` (daemon/source/walks.py); the status view
(daemon/source/mirror_view.py) reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable, Iterable

import structlog

from volkeeper.core.mirror_engine import MirrorEngine
from volkeeper.core.mirror_ledger import Ledger
from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.core.ready import Close, Ready, Sent
from volkeeper.core.stats import RateMeter
from volkeeper.daemon.source.compare import Comparer
from volkeeper.daemon.source.intent_writer import IntentWriter
from volkeeper.daemon.source.mirror_spec import MirrorSpec, hello_for, send_settings
from volkeeper.daemon.source.op import Op, frame_of
from volkeeper.daemon.source.peer_session import Refused, open_session
from volkeeper.daemon.source.sender import Sender
from volkeeper.daemon.source.verify import VerifyResult
from volkeeper.daemon.source.walks import Walks
from volkeeper.errors import PeerError
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.peer_trust import PeerTrust
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.mirror")


class Mirror:
    def __init__(
        self,
        spec: MirrorSpec,
        node: str,
        service: VolumeService,
        store: IntentStore,
        readers: IoWorkers,
        compressors: IoWorkers,
        trust: PeerTrust | None = None,
        state: MirrorState = MirrorState.RESYNC_PENDING,
        *,
        peer_timeout: float,
    ) -> None:
        """``peer_timeout``: seconds the target may say nothing before the link is dropped
        (the node's ``[node] peer_timeout``)."""
        self.spec = spec
        self.node = node
        self.service = service
        self.store = store
        self.readers = readers
        self.compressors = compressors
        self.trust = trust
        self.engine: MirrorEngine[Op, range] = MirrorEngine(
            store.bitmap, spec.target, os.strerror, state, store.generations,
            lambda: secrets.randbits(64) or 1, peer_timeout,
        )  # fmt: skip
        self.engine.configure(spec.settings.mode, spec.settings.queue_limit)
        self.link: PeerLink | None = None
        self.sender: Sender | None = None  # the link's ordered, compressed, throttled way out
        self._earlier_wire_bytes = 0  # of links before this one
        self.sent_bytes = 0  # write and resync payload bytes shipped
        self.resync_sent_bytes = 0  # of them, by resyncs
        self.comparer = Comparer(self.ledger, service, readers)  # region digests of both sides
        self.throughput = RateMeter()  # of sent_bytes
        self.on_state: Callable[[Mirror, MirrorState, MirrorEvent], None] = lambda *_: None
        self.on_target_error: Callable[[Mirror, str], None] = lambda *_: None
        # the target is the job's source now (daemon/roles/switchover.py takes it from here)
        self.on_deposed: Callable[[Mirror, str], None] = lambda *_: None
        self.on_switchover_request: Callable[[Mirror], None] = lambda *_: None
        self.job_document: Callable[[], str] = str  # the job record sent to the target
        self.epoch = 0  # the job's (its HELLO says it)
        self.keep = False  # a split brain was resolved keeping this side (HELLO says so)
        self.owed_runs: list[tuple[int, int]] = []  # byte ranges the target last gave up
        self.intent = IntentWriter(store, f"{spec.job} -> {spec.target}", self._intent_failed)
        self.walks = Walks(self)  # its resync and verify
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self.clock: Callable[[], float] = lambda: 0.0  # the loop's, once running
        # Ops issued but not complete (set by Replication): a resync read racing one of them
        # may have seen the disk before that write reached it.
        self.in_flight_ops: Callable[[], Iterable[Op]] = tuple

    @property
    def state(self) -> MirrorState:
        return self.engine.state

    @property
    def ledger(self) -> Ledger[Op, range]:
        return self.engine.ledger

    @property
    def last_error(self) -> str:
        return self.engine.last_error

    @property
    def tracking(self) -> bool:
        """Not Broken: only then do writes wait for the intent log (a Broken mirror's log
        may be on a failed disk)."""
        return self.engine.state is not MirrorState.BROKEN

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the target connected until ``stop()``; never raises."""
        self.clock = asyncio.get_running_loop().time
        attempt = 0
        while not self.engine.stopping:
            if not self.engine.wants_link:
                await self._sleep(None)
                continue
            try:
                await self._connect_and_serve()
                attempt = 0
            except Refused as exc:
                self.engine.note(str(exc))
                log.info("mirror target refused", job=self.spec.job, why=str(exc))
                if exc.refusal.reason == pw.RefuseReason.SOURCE_MOVED:
                    self.on_deposed(self, exc.refusal.message)
                elif exc.refusal.reason == pw.RefuseReason.SPLIT_BRAIN:
                    self.apply(self.engine.split_brain(exc.refusal.message))
            except (PeerError, TimeoutError) as exc:
                self.engine.note(str(exc))
                log.info("mirror target unreachable", job=self.spec.job, why=str(exc))
            except Exception as exc:  # a bug: say so, drop the link, keep the mirror alive
                self.engine.note(f"internal error: {exc!r}")
                log.exception("mirror connection failed", job=self.spec.job)
                if self.link is not None:
                    self.link.close(self.last_error)
            await self._sleep(self.engine.backoff(attempt))
            attempt += 1

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep, cut short by an administrator's command."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def stop(self, goodbye: pw.GoodbyeReason | None = None) -> None:
        self.engine.stop()
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
        hello = hello_for(
            self.spec, self.node, self.service, self.store.generations, self.epoch,
            self.store.bitmap.marked_bytes, keep=self.keep,
        )  # fmt: skip
        link, answer, owed = await open_session(
            self.spec.target_address, hello, self._on_frame, self._on_lost,
            trust=self.trust, peer_name=self.spec.target_node,
        )  # fmt: skip
        self.link = link
        self.sender = Sender(link, self.compressors, send_settings(self.spec.settings))
        if not link.is_open:  # lost before it was ours: _on_lost ignored it
            raise PeerError("link lost during the handshake")
        if self.engine.state is MirrorState.SPLIT_BRAIN:  # the other side gave way
            self.apply(self.engine.resolved())
        if owed is not None:  # it was deposed: its changes are resynced over, with ours
            self.owed_runs = await self.intent.merge(owed.image, owed.region_size)
            log.warning("the target's own changes will be overwritten", job=self.spec.job,
                        target=self.spec.target, ranges=self.owed_runs[:64])  # fmt: skip
        handshake = self.engine.handshake(
            self.clock(), answer.current_generation, answer.data_state == pw.DataState.UP_TO_DATE
        )
        if handshake.mark_all:  # a checksum resync sends only the regions that differ
            how = "checksum resync" if self.engine.checksum_next else "full resync"
            log.info(f"target generation unrelated: {how}", job=self.spec.job)
        await self._carry_out(handshake)
        admitted = self.engine.admitted(link.is_open)
        if admitted.close is None:
            self.announce()
        self.apply(admitted)
        await self._watch(link)

    async def _watch(self, link: PeerLink) -> None:
        """PING the target every ``ping_interval``, the first at once (from then on the
        target counts this source's silence: daemon/target/target_session.py); a target
        silent too long is dropped (``MirrorEngine.idle``)."""
        token = 0
        while not self._lost.is_set() and link.is_open:
            token += 1
            link.send(pw.Ping(token))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.engine.ping_interval)
            if self._lost.is_set() or not link.is_open:
                return
            now = self.clock()
            silent = self.engine.idle(now)
            if silent is not None:
                link.close(silent.message)
                return
            self.throughput.sample(now, self.sent_bytes)

    def _on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        if isinstance(frame, pw.Ack):
            ready = self.engine.ack(frame.sequence, frame.errno, self.clock())
            self.apply(ready)
            return
        self.engine.heard(self.clock())
        if isinstance(frame, pw.Hashes):
            if not self.comparer.take(frame):
                link.close(f"HASHES for {frame.request}, which was not asked")
        elif isinstance(frame, pw.SwitchoverRequest):
            self.on_switchover_request(self)
        elif isinstance(frame, pw.Goodbye) and frame.reason == pw.GoodbyeReason.SHUTDOWN:
            # A clean target stop: it made every write it ACKed durable before saying so.
            self.apply(self.engine.target_shut_down_cleanly())
        elif not isinstance(frame, pw.Pong | pw.Goodbye):
            link.close(f"unexpected {frame.TYPE.name} frame from the target")

    def _on_lost(self, link: PeerLink, reason: str) -> None:
        if link is not self.link:
            return
        self.link = None
        unsent = self._sender().abandon()
        self._earlier_wire_bytes += self._sender().wire_bytes
        self.sender = None
        self.walks.lost(reason, unsent)
        writes = [entry for entry in unsent if isinstance(entry, Sent)]
        self.apply(self.engine.lost(reason, writes))
        self._lost.set()

    # -- carrying out the engine's effects ----------------------------------------------------

    async def _carry_out(self, ready: Ready[Op, range]) -> None:
        """``ready`` may mark every region: persisted before anything else of it is done."""
        if ready.generations is not None:
            self.intent.set_generations(ready.generations)
            ready.generations = None
        if ready.mark_all:
            self.store.bitmap.mark_all()
            await self.intent.durable()
            ready.mark_all = False
        self.apply(ready)

    def apply(self, ready: Ready[Op, range]) -> None:
        """Carry out the engine's effects in the order ``Ready`` prescribes (core/ready.py)."""
        assert not ready.mark_all, "marking every region needs _carry_out"
        if ready.generations is not None:  # rare: blocks the loop for one header write
            self.intent.set_generations(ready.generations)
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
        if ready.send is not None:  # the hot path: an application write goes out
            self._send(ready.send)
        elif ready.changes or ready.records or ready.start_resync or ready.answer or ready.close:
            self._apply_rest(ready)

    def _apply_rest(self, ready: Ready[Op, range]) -> None:
        for before, event in ready.changes:
            self._changed(before, event)
        for record in ready.records:
            generations = self.store.generations
            self.ask(pw.State(record, generations.current, 0))
        if ready.start_resync and self.link is not None:
            self.walks.start_resync(self.link, self._sender(), self.engine.checksum_next)
        if ready.answer is not None:
            self.walks.answer(*ready.answer)
        if ready.failure is not None:
            log.error("target failed a frame", job=self.spec.job, target=self.spec.target,
                      error=self.last_error, errno=ready.failure[0])  # fmt: skip
            self.on_target_error(self, self.last_error)
        if ready.close is not None:
            self._close(ready.close)

    def _close(self, close: Close) -> None:
        link = self.link
        if link is None or not link.is_open:
            return
        if close.record is not None:
            generations = self.store.generations
            link.send(pw.State(close.record, generations.current, generations.previous))
        if close.goodbye is not None:
            link.send(pw.Goodbye(close.goodbye, close.message))
        link.close(close.message)

    def _changed(self, before: MirrorState, event: MirrorEvent) -> None:
        log.info("mirror state", job=self.spec.job, target=self.spec.target,
                 state=self.state.value, was=before.value, cause=event.value)  # fmt: skip
        if event is MirrorEvent.QUEUE_OVERFLOW:
            log.warning("async queue full: tracking and resyncing", job=self.spec.job,
                        queued_bytes=self.ledger.queued_bytes,
                        limit=self.spec.settings.queue_limit)  # fmt: skip
        self.on_state(self, before, event)

    def _intent_failed(self) -> None:
        self.apply(self.engine.intent_log_failed())

    # -- application writes ---------------------------------------------------------------

    def ship(self, op: Op) -> None:
        """Carry ``op`` to the target, or mark it; pays ``op``'s reply part for this mirror."""
        self.apply(
            self.engine.ship(op, op.extents, op.command, op.offset, op.length, len(op.payload))
        )

    def _send(self, entry: Sent[Op, range]) -> None:
        op = entry.token
        self.sent_bytes += entry.size
        self.walks.note_write(op)
        self._sender().send(frame_of(op), entry.size, self._sent, entry)

    def _sent(self, entry: Sent[Op, range], sequence: int) -> None:
        """``entry``'s frame is on the link as ``sequence``."""
        place = self.engine.sent(entry, sequence, self.clock())
        op = entry.token
        if op.is_flush:
            if op.places is None:
                op.places = {}
            op.places[self.spec.target] = place
        if entry.owed:
            self._sender().link.push()

    def _sender(self) -> Sender:
        assert self.sender is not None, "no link"
        return self.sender

    @property
    def asynchronous(self) -> bool:
        """Its writes and flushes are answered without waiting for the target."""
        return self.engine.asynchronous

    def source_write_failed(self, op: Op, error: BaseException) -> None:
        """The local disk failed ``op``, which this mirror shipped: mark and resync it."""
        self.store.activity_log.pin(op.extents)  # held until the marks are persisted
        self.apply(self.engine.source_write_failed(op.extents, op.offset, op.length, str(error)))

    def release_durable(self, op: Op) -> None:
        """``op`` (a flush) is durable locally and on the target: unpin what it covered."""
        place = op.places.get(self.spec.target) if op.places else None
        if place is not None:
            self.apply(self.engine.released(place))

    @property
    def wire_bytes(self) -> int:
        """Payload bytes put on the wire (after compression), over every link so far."""
        return self._earlier_wire_bytes + (self.sender.wire_bytes if self.sender else 0)

    @property
    def undurable_writes(self) -> int:
        return len(self.ledger.undurable)

    # -- administrator commands ----------------------------------------------------------

    def pause(self) -> None:
        """Stop sending; keep marking.  Idempotent."""
        self.apply(self.engine.pause())

    def resume(self) -> None:
        """Continue a paused mirror: reconnect now, then resync what was marked."""
        self.apply(self.engine.resume())
        self._wake.set()

    def resume_split(self) -> None:
        """A split brain resolved keeping this side: connect again (``keep`` says so)."""
        self.apply(self.engine.resolved())
        self._wake.set()

    def break_(self) -> None:
        """Stop tracking: the target's copy is Outdated until a full resync."""
        self.apply(self.engine.break_())

    async def full_resync(self) -> None:
        """Mark every region and resend it all (the only repair of a Broken mirror)."""
        await self._carry_out(self.engine.full_resync())
        self._wake.set()

    async def checksum_resync(self) -> None:
        """Mark every region, then resync by comparing digests first: only regions that
        differ are sent.  A connected mirror reconnects to start it."""
        await self._carry_out(self.engine.checksum_resync())
        self._wake.set()

    def start_verify(self, mark: bool) -> VerifyResult:
        """Compare source and target while mirroring goes on (daemon/source/walks.py)."""
        return self.walks.start_verify(self.sender, mark)

    def configure(self, spec: MirrorSpec) -> None:
        """New settings (mode, queue limit, compression, throttle), live: ops already sent
        keep the terms they were sent on (a sync op still waits for its ACK)."""
        self.spec = spec
        self.engine.configure(spec.settings.mode, spec.settings.queue_limit)
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
        self._close(Close(message))
