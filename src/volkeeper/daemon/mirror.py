"""The source end of one mirror: ship writes to the target, keep the intent log, resync.

How this works (docs/mirroring.md has the reasoning): a ``Mirror`` owns the link to its
target, the mirror's intent log (``IntentStore``: bitmap + activity log) and its state
(core/mirror_state.py).  ``run()`` keeps a link up: connect, HELLO, and on HELLO_OK decide
between a partial resync (same generation: the bitmap says what differs) and a full one
(anything else), then stream the marked regions (``_resync``) while application writes keep
flowing; on loss it marks what the target may lack and reconnects with backoff.

Application writes reach ``ship(op)`` through ``Replication`` (daemon/replication.py), already
ordered and with their activity-log extents durably active.  What ``ship`` does depends on
the state:

    link up (Mirroring, Resyncing)   send the frame; the op's mirror part completes on ACK
    link down (Resync pending,       mark the range in the bitmap; the part completes once the
      Paused)                        bitmap page is durable (coalesced: one fsync per batch)
    Broken                           nothing is tracked; the part completes at once

ACKed writes stay pinned in the activity log until a FLUSH has made them durable on both
sides (``release_durable``); when the link drops, every write not known durable on the target
is marked and persisted first, then unpinned.  Metadata I/O (snapshots, bitmap pages) runs on
this mirror's own thread (daemon/intent_writer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from volkeeper.core import peer_wire as pw
from volkeeper.core.addresses import TcpAddress
from volkeeper.core.mirror_state import MirrorEvent, MirrorState, next_state
from volkeeper.daemon.intent_writer import IntentWriter
from volkeeper.errors import PeerError
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.peer_link import PeerLink, connect
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.mirror")

RESYNC_CHUNK = 1024 * 1024  # bytes read and sent per RESYNC_DATA frame, at most
RESYNC_BATCH = 8 * 1024 * 1024  # bytes sent between FLUSHes that let bits be cleared
HANDSHAKE_TIMEOUT = 10.0
PING_INTERVAL = 2.0  # an idle link is pinged this often
TARGET_TIMEOUT = 10.0  # a target that says nothing this long is lost
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class MirrorSpec:
    job: str
    source_volume: str
    target_node: str
    target_address: TcpAddress
    target_volume: str
    mode: str = "sync"

    @property
    def target(self) -> str:
        return f"{self.target_node}:{self.target_volume}"


@dataclass(eq=False)
class Op:
    """One mutation or flush of the source volume, as every mirror and the local disk see it."""

    command: str  # "write", "zero", "trim" or "flush"
    offset: int
    length: int
    payload: bytes | bytearray = b""
    fua: bool = False
    may_trim: bool = False
    extents: range = range(0)
    on_done: Callable[[BaseException | None], None] = lambda error: None
    parts: int = 0  # completions still awaited (the local disk and each mirror)
    error: BaseException | None = None
    sequences: dict[str, int] = field(default_factory=dict)  # mirror job -> frame sequence

    def part_done(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.parts -= 1
        if self.parts == 0:
            self.on_done(self.error)


@dataclass
class _Chunk:
    first: int
    count: int
    raced: bool = False


class Mirror:
    def __init__(
        self,
        spec: MirrorSpec,
        node: str,
        service: VolumeService,
        store: IntentStore,
        readers: IoWorkers,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.spec = spec
        self.tls = tls
        self.node = node
        self.service = service
        self.store = store
        self.readers = readers
        self.state = MirrorState.RESYNC_PENDING
        self.link: PeerLink | None = None
        self.last_error = ""
        self.sent_bytes = 0
        self.resync_done_bytes = 0
        self.resync_total_bytes = 0
        self.intent = IntentWriter(store, spec.job, self._break)
        self._pending: dict[int, Op] = {}  # frame sequence -> op awaiting its ACK
        self._undurable: list[tuple[int, Op]] = []  # ACKed, not yet durable on the target
        self._answer: asyncio.Future[pw.Frame] | None = None
        self._resync_acks: dict[int, asyncio.Future[int]] = {}
        self._chunks: list[_Chunk] = []  # resync chunks read but not yet durable
        self._stopping = False
        self._lost = asyncio.Event()
        self._resync_task: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        # Ops issued but not complete (set by Replication): a resync read racing one of them
        # may have seen the disk before that write reached it.
        self.in_flight_ops: Callable[[], Iterable[Op]] = tuple

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the target connected until ``stop()``; never raises."""
        attempt = 0
        while not self._stopping:
            if self.state in (MirrorState.PAUSED, MirrorState.BROKEN):
                await asyncio.sleep(0.2)
                continue
            try:
                await self._connect_and_serve()
                attempt = 0
            except (PeerError, TimeoutError) as exc:
                self.last_error = str(exc)
                log.info("mirror target unreachable", job=self.spec.job, why=str(exc))
            except asyncio.CancelledError:
                raise
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1

    async def stop(self, goodbye: pw.GoodbyeReason | None = None) -> None:
        self._stopping = True
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
        link = await connect(
            self.spec.target_address,
            self._on_frame,
            self._on_lost,
            tls=self.tls,
            peer_name=self.spec.target_node,
        )
        self._last_heard = asyncio.get_running_loop().time()
        self.link = link
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        volume = self.service.volume
        generations = self.store.generations
        link.send(
            pw.Hello(
                node=self.node,
                volume=self.spec.target_volume,
                job=self.spec.job,
                source_volume=self.spec.source_volume,
                volume_size=volume.size,
                sector_size=volume.sector_size,
                current_generation=generations.current,
                previous_generation=generations.previous,
            )
        )
        answer = await asyncio.wait_for(self._answer, HANDSHAKE_TIMEOUT)
        if isinstance(answer, pw.Refuse):
            link.close("refused")
            raise PeerError(f"{self.spec.target} refused: {answer.message}")
        assert isinstance(answer, pw.HelloOk)
        await self._admitted(answer)
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

    async def _admitted(self, ok: pw.HelloOk) -> None:
        assert self.link is not None
        current = self.store.generations.current
        if ok.current_generation != current:
            log.info("target generation differs: full resync", job=self.spec.job)
            self.store.bitmap.mark_all()
            await self.intent.durable()
        self.last_error = ""
        if self.store.bitmap.marked_count:
            self._set(MirrorEvent.CONNECTED_DIRTY)
            self.link.send(pw.State(pw.DataState.INCONSISTENT, current, 0))
            self._resync_task = asyncio.create_task(self._resync(self.link))
            self._resync_task.add_done_callback(self._resync_ended)
        else:
            self._set(MirrorEvent.CONNECTED_CLEAN)
            if ok.data_state != pw.DataState.UP_TO_DATE:
                self.link.send(pw.State(pw.DataState.UP_TO_DATE, current, 0))

    def _on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        answer = self._answer
        if answer is not None and not answer.done() and isinstance(frame, pw.HelloOk | pw.Refuse):
            answer.set_result(frame)
            return
        if isinstance(frame, pw.Ack):
            self._acked(frame)
        elif isinstance(frame, pw.Goodbye) and frame.reason == pw.GoodbyeReason.SHUTDOWN:
            # A clean target stop: it made every write it ACKed durable before saying so.
            for _, op in self._undurable:
                self.store.activity_log.unpin(op.extents)
            self._undurable.clear()
        elif isinstance(frame, pw.Pong | pw.Goodbye):
            pass
        else:
            link.close(f"unexpected {frame.TYPE.name} frame from the target")

    def _on_lost(self, link: PeerLink, reason: str) -> None:
        if link is not self.link:
            return
        self.link = None
        self.last_error = reason
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(PeerError(reason))
        for future in self._resync_acks.values():
            if not future.done():
                future.set_exception(PeerError(reason))
        self._resync_acks.clear()
        self._chunks.clear()
        if self.state in (MirrorState.MIRRORING, MirrorState.RESYNCING):
            self._set(MirrorEvent.DISCONNECTED)
        lost = list(self._pending.values()) + [op for _, op in self._undurable]
        pending = list(self._pending.values())
        self._pending.clear()
        self._undurable.clear()
        for op in lost:
            if op.command != "flush":
                self.store.bitmap.mark(op.offset, op.length)

        def durable() -> None:
            for op in lost:
                self.store.activity_log.unpin(op.extents)
            for op in pending:
                op.part_done()

        self.intent.after_durable(durable)
        self._lost.set()

    # -- application writes ---------------------------------------------------------------

    def ship(self, op: Op) -> None:
        """Carry ``op`` to the target, or mark it; calls ``op.part_done`` once for this mirror."""
        link = self.link
        if link is not None and link.is_open and self.state in _SENDING:
            frame = _frame(op)
            sequence = link.send(frame)
            op.sequences[self.spec.job] = sequence
            self._pending[sequence] = op
            self.sent_bytes += len(op.payload)
            if op.command != "flush":
                self._note_race(op)
            return
        if op.command == "flush" or self.state is MirrorState.BROKEN:
            self.store.activity_log.unpin(op.extents)
            op.part_done()
            return
        self.store.bitmap.mark(op.offset, op.length)

        def durable() -> None:
            self.store.activity_log.unpin(op.extents)
            op.part_done()

        self.intent.after_durable(durable)

    def _acked(self, ack: pw.Ack) -> None:
        future = self._resync_acks.pop(ack.sequence, None)
        if future is not None:
            if not future.done():
                future.set_result(ack.errno)
            return
        op = self._pending.pop(ack.sequence, None)
        if op is None:
            return
        if ack.errno:  # the target could not write it: it will get the region by resync
            log.error("target failed a write", job=self.spec.job, errno=ack.errno)
            self.store.bitmap.mark(op.offset, op.length)

            def marked() -> None:
                self.store.activity_log.unpin(op.extents)
                op.part_done()

            self.intent.after_durable(marked)
            return
        if op.command == "flush":
            op.part_done()
            return
        self._undurable.append((ack.sequence, op))
        op.part_done()

    def release_durable(self, op: Op) -> None:
        """``op`` (a flush) is durable locally and on the target: unpin what it covered."""
        sequence = op.sequences.get(self.spec.job)
        if sequence is None:
            return
        keep = []
        for acked, earlier in self._undurable:
            if acked < sequence:
                self.store.activity_log.unpin(earlier.extents)
            else:
                keep.append((acked, earlier))
        self._undurable = keep

    @property
    def needs_flush(self) -> bool:
        return bool(self._undurable)

    # -- resync -------------------------------------------------------------------------------

    def _resync_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("resync failed", job=self.spec.job, error=repr(error))
            self.last_error = f"resync failed: {error}"
            if self.link is not None:
                self.link.close(self.last_error)

    async def _resync(self, link: PeerLink) -> None:
        bitmap = self.store.bitmap
        self.resync_total_bytes = bitmap.marked_bytes
        self.resync_done_bytes = 0
        regions_per_chunk = max(1, RESYNC_CHUNK // bitmap.region_size)
        try:
            while link.is_open and self.state is MirrorState.RESYNCING:
                sent = 0
                for first, count in list(bitmap.runs(0, regions_per_chunk)):
                    sent += await self._send_chunk(link, first, count)
                    if sent >= RESYNC_BATCH:
                        await self._commit_chunks(link)
                        sent = 0
                await self._commit_chunks(link)
                if bitmap.marked_count == 0:
                    await self._finish_resync(link)
                    return
        except PeerError:
            return  # the link dropped: _on_lost has already moved the state

    async def _send_chunk(self, link: PeerLink, first: int, count: int) -> int:
        bitmap = self.store.bitmap
        offset = bitmap.region_span(first)[0]
        last_offset, last_length = bitmap.region_span(first + count - 1)
        length = last_offset + last_length - offset
        chunk = _Chunk(first, count)
        self._chunks.append(chunk)
        for op in self.in_flight_ops():
            if op.command != "flush":
                self._note_race(op)
        data = await self._read(offset, length)
        if not link.is_open:
            raise PeerError("link lost during resync")
        link.send(pw.ResyncData(offset, data))
        self.sent_bytes += length
        self.resync_done_bytes += length
        await link.drained()
        return length

    async def _commit_chunks(self, link: PeerLink) -> None:
        """FLUSH the target; once durable, clear the chunks no application write raced."""
        if not self._chunks:
            return
        chunks, self._chunks = self._chunks, []
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._resync_acks[link.send(pw.Flush())] = future
        if await future:
            raise PeerError("target failed to flush resync data")
        for chunk in chunks:
            if not chunk.raced:
                self.store.bitmap.clear_regions(chunk.first, chunk.count)

    async def _finish_resync(self, link: PeerLink) -> None:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        state = pw.State(pw.DataState.UP_TO_DATE, self.store.generations.current, 0)
        self._resync_acks[link.send(state)] = future
        if await future:
            raise PeerError("target failed to record its new state")
        await self.intent.durable()
        self._set(MirrorEvent.RESYNC_DONE)
        log.info("resync finished", job=self.spec.job, bytes=self.resync_done_bytes)

    def _note_race(self, op: Op) -> None:
        bitmap = self.store.bitmap
        first, last = (
            bitmap.region_of(op.offset),
            bitmap.region_of(op.offset + max(op.length, 1) - 1),
        )
        for chunk in self._chunks:
            if first < chunk.first + chunk.count and chunk.first <= last:
                chunk.raced = True

    async def _read(self, offset: int, length: int) -> bytes | bytearray:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(result: object, error: BaseException | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.readers.submit(self.service.volume.read, (offset, length), done)
        data: bytes | bytearray = await future
        return data

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

    def _break(self) -> None:
        with contextlib.suppress(ValueError):
            self._set(MirrorEvent.BREAK)

    def view(self) -> dict[str, Any]:
        total, done = self.resync_total_bytes, self.resync_done_bytes
        resyncing = self.state is MirrorState.RESYNCING
        return {
            "job": self.spec.job,
            "source": f"{self.node}:{self.spec.source_volume}",
            "target": self.spec.target,
            "mode": self.spec.mode,
            "state": self.state.value,
            "out_of_sync_bytes": self.store.bitmap.marked_bytes,
            "sent_bytes": self.sent_bytes,
            "compression": "none",
            "throttle": None,
            "resync": {
                "done_bytes": done if resyncing else 0,
                "total_bytes": total if resyncing else 0,
                "rate_bytes_per_s": 0,
                "eta_s": None,
            },
            "intent_log": {
                "region_bytes": self.store.bitmap.region_size,
                "hot_extents": len(self.store.activity_log.active_extents),
                "hot_extent_bytes": self.store.activity_log.extent_bytes,
                "crash_resync_bound_bytes": min(
                    self.store.activity_log.resync_bound_bytes, self.service.volume.size
                ),
            },
            "last_error": self.last_error or None,
        }


_SENDING = frozenset({MirrorState.MIRRORING, MirrorState.RESYNCING})


def _frame(op: Op) -> pw.Frame:
    if op.command == "write":
        return pw.Write(op.offset, op.payload, op.fua)
    if op.command == "zero":
        return pw.Zero(op.offset, op.length, fua=op.fua, may_trim=op.may_trim)
    if op.command == "trim":
        return pw.Trim(op.offset, op.length, fua=op.fua)
    return pw.Flush()
