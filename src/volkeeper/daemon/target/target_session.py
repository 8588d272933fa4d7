"""The target end of a mirror's connection: admit the source, then apply its frames in order.

How this works: every connection to the node's replication port gets a ``TargetSession``
(``targets.TargetVolumes.make_link``).  Its first frame must be a HELLO; a connection that says
nothing is closed after ``HELLO_TIMEOUT``.  Over TLS, the source's certificate must name the
node its HELLO claims to be.  ``TargetVolumes.admit`` checks the rest and, on the first HELLO for
the volume, claims it (records and locks: see ``targets``).  The answer is HELLO_OK with what
the record says of this copy (data state, generations), or REFUSE naming the reason.

A mirror session whose source pinged and then went silent for the node's ``peer_timeout`` is
closed (``watch_silence``, daemon/target/silence.py).

After that the session applies WRITE, RESYNC_DATA, ZERO, TRIM and FLUSH frames through the
volume's writer thread -- one FIFO -- so they reach the disk in the order the source sent them
(invariant 1), and ACKs each with its sequence number once done; a FLUSH's ACK carries
DURABLE. A small write that arrives while that thread has nothing queued is copied to the page
cache on the loop instead (as on the NBD path): nothing earlier is pending, so the order
holds, and its ACK leaves with the others of the same receive. A STATE frame rewrites the
record through the same FIFO, so "UpToDate" is recorded only after every earlier write; so
does a JOB frame (the job's document). A GOODBYE(DELETED) releases the volume, a
GOODBYE(PAUSED) marks its record paused. Anything out of place closes that session only.
When the node stops cleanly, each session flushes its volume and says GOODBYE(SHUTDOWN) first.
A HANDOVER (a switchover) makes this node the job's source (``TargetVolumes.adopt``).

A frame that fails (a full or failing disk) is ACKed with its errno, and the copy is no
longer a faithful one: the session is marked failed from that instant, in the thread that saw
the error (so a STATE already queued behind the failed write cannot record UpToDate: it is
refused), the volume's record is set Inconsistent, and the volume's last error is kept for
``status`` (``TargetVolumes.failed``) until a resync ends with the source's UpToDate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

import structlog

from volkeeper.core import region_hash
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.target.silence import watch_silence
from volkeeper.daemon.target.target_record import TargetRecord, TargetRecords
from volkeeper.errors import ProtocolError, Refusal, VolumeError
from volkeeper.io.codecs import decompress
from volkeeper.io.limits import Limits
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.target")

SHUTDOWN_FLUSH_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0  # a connection that has not said HELLO by then is closed
TAKEOVER_GRACE = 5.0  # a handover's mirrors start by then even if the old source is silent
_tasks: set[asyncio.Future[None]] = set()  # handovers being taken (kept from the collector)


class TargetVolumes(Protocol):
    """What a session needs of the node's target volumes (``TargetVolumes`` of
    daemon/target/targets.py)."""

    node: str
    store: TargetRecords
    records: dict[str, TargetRecord]
    sessions: dict[str, TargetSession]
    received_bytes: dict[str, int]
    lost_at: dict[str, float]
    peer_timeout: float
    vouch: Callable[[str, PeerLink], str | None]
    limits: Limits

    def admit(self, hello: pw.Hello) -> tuple[VolumeService, TargetRecord] | pw.Refuse: ...

    def changed(self, volume: str) -> None: ...

    def failed(self, volume: str, message: str) -> TargetRecord | None: ...

    def recovered(self, volume: str) -> None: ...

    def paused(self, volume: str) -> None: ...

    def release(self, volume: str) -> None: ...

    adopt: Callable[[str, str], Awaitable[Callable[[], None]]]


class TargetSession:
    def __init__(self, volumes: TargetVolumes) -> None:
        self.targets = volumes  # the node's target volumes
        self.volume: str | None = None
        self.service: VolumeService | None = None
        self.record: TargetRecord | None = None
        self.link: PeerLink | None = None
        self.failed: str | None = None  # the first frame this session could not apply
        self.pinged = False  # the source pings: a mirror's link (short sessions do not)
        self.queued = 0  # payload bytes of frames taken and not yet written
        self.holding = False  # the link is not read while queued is over the limit
        self._took_over: Callable[[], None] | None = None  # starts the mirrors of a handover

    def on_frame(self, link: PeerLink, frame: pw.Frame) -> None:
        if self.service is None:
            self._handshake(link, frame)
            return
        sequence = link.last_received
        apply = self._APPLY.get(type(frame))
        if apply is None:
            link.close(f"unexpected {frame.TYPE.name} frame {sequence} from a source")
            return
        apply(self, link, sequence, frame)

    def expire(self, link: PeerLink) -> None:
        if self.service is None and link.is_open:
            link.close(f"no HELLO within {HELLO_TIMEOUT:.0f} s")

    def on_lost(self, link: PeerLink, reason: str) -> None:
        if self.volume is not None and self.targets.sessions.get(self.volume) is self:
            del self.targets.sessions[self.volume]
            self.targets.lost_at[self.volume] = time.time()
            self.targets.changed(self.volume)
        self._start_taken_over()

    def _start_taken_over(self) -> None:
        start, self._took_over = self._took_over, None
        if start is not None:
            start()

    def _handshake(self, link: PeerLink, frame: pw.Frame) -> None:
        if not isinstance(frame, pw.Hello):
            link.close(f"expected HELLO, got {frame.TYPE.name}")
            return
        distrust = self.targets.vouch(frame.node, link)
        if distrust is not None:
            admitted: tuple[VolumeService, TargetRecord] | pw.Refuse = pw.Refuse(
                pw.RefuseReason.OTHER, distrust
            )
        else:
            admitted = self.targets.admit(frame)
        if isinstance(admitted, pw.Refuse):
            log.warning("mirror source refused", source=frame.node, why=admitted.message)
            link.send(admitted)
            link.close(f"refused: {admitted.message}")
            return
        self.service, self.record = admitted
        self.volume = frame.volume
        self.link = link
        self.targets.sessions[frame.volume] = self
        self.targets.changed(frame.volume)
        watch_silence(
            link, self.targets.peer_timeout, lambda: self.pinged,
            volume=frame.volume, mirror=self.record.mirror,
        )  # fmt: skip
        volume = self.service.volume
        record = self.record
        link.send(
            pw.HelloOk(
                node=self.targets.node,
                volume=frame.volume,
                volume_size=volume.size,
                sector_size=volume.sector_size,
                current_generation=record.current_generation,
                previous_generation=record.previous_generation,
                data_state=pw.DataState[record.data_state],
                owed=bool(record.owed),
            )
        )
        if record.owed:  # deposed: what we changed goes into the new source's resync
            link.send(pw.Marked(record.owed_region_size, base64.b64decode(record.owed)))

    # -- applying frames in order: small writes inline while the writer is idle, else on it --

    def _submit(
        self,
        link: PeerLink,
        sequence: int,
        function: Callable[..., Any],
        *args: Any,
        durable: bool,
        recycle: pw.Buffer = b"",
        then: Callable[[], None] | None = None,
        size: int = 0,
    ) -> None:
        def apply(*args: Any) -> Any:  # on the writer thread, in FIFO order
            try:
                return function(*args)
            except BaseException as error:
                self.failed = self.failed or str(error) or repr(error)
                raise

        def done(result: object, error: BaseException | None) -> None:
            link.recycle(recycle)
            self._queue(link, -size)
            code = 0
            if isinstance(error, VolumeError):
                code = error.errno
            elif isinstance(error, ProtocolError):  # compressed data that does not decompress
                code = errno.EBADMSG
            elif error is not None:
                code = errno.EIO
                log.error("applying a mirror frame crashed", sequence=sequence, error=repr(error))
            if code:
                corrupt = isinstance(error, ProtocolError)
                self._failed(sequence, str(error) or repr(error), corrupt=corrupt)
            elif then is not None:
                then()
            if link.is_open:
                link.send(pw.Ack(sequence, code, durable=durable and not code))

        assert self.service is not None
        self._queue(link, size)
        self.service.submit(apply, *args, mutating=True, on_done=done)

    def _queue(self, link: PeerLink, size: int) -> None:
        """Count ``size`` bytes in (or out, negative) of the writer's queue; hold the link
        while over ``peer_queued_bytes``, release it at half (io/limits.py)."""
        self.queued += size
        limits = self.targets.limits
        if not self.holding and self.queued > limits.peer_queued_bytes:
            self.holding = True
            limits.hit("peer_queued_bytes", volume=self.volume, queued=self.queued)
            link.hold(True)
        elif self.holding and self.queued <= limits.peer_queued_bytes // 2:
            self.holding = False
            link.hold(False)

    def _failed(self, sequence: int, message: str, corrupt: bool = False) -> None:
        """Frame ``sequence`` was not applied: this copy is Inconsistent from now on."""
        what = "a mirror frame's data is corrupt" if corrupt else "applying a mirror frame failed"
        log.error(what, sequence=sequence, error=message)
        self.failed = self.failed or message
        if self.volume is None or self.service is None:
            return
        record = self.targets.failed(self.volume, message)
        if record is not None:  # it was UpToDate or Consistent: record the downgrade
            volume, self.record = self.volume, record

            def save() -> None:
                self.targets.store.save(volume, record)

            self.service.submit(save, mutating=True, on_done=_logged("saving Inconsistent"))

    def _write(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Write | pw.ResyncData) and self.service is not None
        service, data = self.service, frame.data
        received = self.targets.received_bytes
        received[service.name] = received.get(service.name, 0) + len(data)
        if not frame.fua:  # a small write while the writer is idle: a page-cache copy, here
            try:
                done = service.try_write(frame.offset, data)
            except VolumeError as error:
                self._failed(sequence, str(error))
                link.send(pw.Ack(sequence, error.errno))
                return
            if done == len(data):
                link.send(pw.Ack(sequence, 0))
                link.recycle(data)
                return
            if done:
                rest = memoryview(data)[done:]
                frame = dataclasses.replace(frame, offset=frame.offset + done, data=rest)
        self._submit(
            link, sequence, service.write, frame.offset, frame.data, frame.fua,
            durable=frame.fua, recycle=data, size=len(frame.data),
        )  # fmt: skip

    def _write_compressed(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        """Decompressed on the volume's writer thread, in its place in the FIFO."""
        assert isinstance(frame, pw.WriteCompressed | pw.ResyncCompressed)
        service = self.service
        assert service is not None
        received = self.targets.received_bytes
        received[service.name] = received.get(service.name, 0) + frame.raw_length

        def write() -> None:
            data = decompress(frame.codec, bytes(frame.data), frame.raw_length)
            service.write(frame.offset, data, frame.fua)

        self._submit(link, sequence, write, durable=frame.fua, size=len(frame.data))

    def _hash_request(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        """Digests of the range as it is after every earlier frame: hashed in the FIFO."""
        assert isinstance(frame, pw.HashRequest) and self.service is not None
        volume = self.service.volume

        def hash_range() -> bytes:
            if frame.offset + frame.length > volume.size:
                raise VolumeError(f"hash range past the end of {volume.name}", errno.EINVAL)
            return region_hash.digests(volume.read(frame.offset, frame.length), frame.region_size)

        def done(result: object, error: BaseException | None) -> None:
            if not link.is_open:
                return
            if isinstance(result, bytes):
                link.send(pw.Hashes(sequence, result))
            else:
                code = error.errno if isinstance(error, VolumeError) else errno.EIO
                log.error("hashing for a source failed", sequence=sequence, error=str(error))
                link.send(pw.Ack(sequence, code))

        self.service.submit(hash_range, mutating=True, on_done=done)

    def _zero(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Zero) and self.service is not None
        args = (frame.offset, frame.length, frame.may_trim, frame.fua)
        self._submit(link, sequence, self.service.write_zeroes, *args, durable=frame.fua)

    def _trim(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Trim) and self.service is not None
        args = (frame.offset, frame.length, frame.fua)
        self._submit(link, sequence, self.service.trim, *args, durable=frame.fua)

    def _flush(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert self.service is not None
        self._submit(link, sequence, self.service.volume.flush, durable=True)

    def _state(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.State) and self.record is not None
        record = dataclasses.replace(
            self.record,
            data_state=frame.data_state.name,
            current_generation=frame.current_generation,
            previous_generation=frame.previous_generation,
        )
        if frame.data_state is pw.DataState.UP_TO_DATE:  # the resync covered what we owed
            record = dataclasses.replace(record, owed="", owed_region_size=0)
        self._record(link, sequence, record)

    def _job(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Job) and self.record is not None
        try:
            job = JobRecord.from_json(frame.document)
        except ValueError as exc:
            link.close(f"JOB frame {sequence}: bad job document: {exc}")
            return
        if job.name != self.record.job:
            link.close(f"JOB frame {sequence}: job {job.name!r}, but this is {self.record.mirror}")
            return
        self._record(link, sequence, dataclasses.replace(self.record, job_document=frame.document))

    def _record(self, link: PeerLink, sequence: int, record: TargetRecord) -> None:
        """Rewrite this volume's record in the FIFO, after every earlier write; ACK it then."""
        volume = self.volume
        assert volume is not None

        def save() -> None:  # in the FIFO: every earlier frame has been applied, or failed
            if self.failed is not None and record.data_state == pw.DataState.UP_TO_DATE.name:
                raise VolumeError(f"not recording UpToDate: an earlier frame failed: {self.failed}")
            self.targets.store.save(volume, record)

        def saved() -> None:
            if record.data_state == pw.DataState.UP_TO_DATE.name:
                self.targets.recovered(volume)

        self.record = self.targets.records[volume] = record
        self.targets.changed(volume)
        self._submit(link, sequence, save, durable=True, then=saved)

    async def flush_and_leave(self) -> None:
        link, service = self.link, self.service
        if link is None or service is None or not link.is_open:
            return
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def flushed(result: object, error: BaseException | None) -> None:
            if error is None and link.is_open:
                link.send(pw.Goodbye(pw.GoodbyeReason.SHUTDOWN, "target stopping, all durable"))
            link.close("target stopping")
            if not left.done():
                left.set_result(None)

        service.submit(service.volume.flush, mutating=True, on_done=flushed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(left, SHUTDOWN_FLUSH_TIMEOUT)

    def _handover(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        """A switchover: this node becomes the job's source (daemon/roles/switchover.py).
        ACKed once that is on disk; the new mirrors start when the old source, a target
        now, closes this session (or after ``TAKEOVER_GRACE``), so their first HELLO
        finds it ready."""
        assert isinstance(frame, pw.Handover) and self.volume is not None
        volume = self.volume

        async def take_over() -> None:
            try:
                self._took_over = await self.targets.adopt(volume, frame.document)
            except Refusal as exc:
                log.warning("handover refused", volume=volume, why=str(exc))
                if link.is_open:
                    link.send(pw.Goodbye(pw.GoodbyeReason.OTHER, str(exc)[: pw.MAX_MESSAGE]))
                    link.close(f"handover refused: {exc}")
                return
            if link.is_open:
                link.send(pw.Ack(sequence, 0, durable=True))
                asyncio.get_running_loop().call_later(TAKEOVER_GRACE, self._start_taken_over)
            else:
                self._start_taken_over()

        _tasks.add(task := asyncio.ensure_future(take_over()))
        task.add_done_callback(_tasks.discard)

    def _ping(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Ping)
        self.pinged = True
        link.send(pw.Pong(frame.token))

    def _goodbye(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Goodbye) and self.volume is not None
        if frame.reason == pw.GoodbyeReason.DELETED:
            self.targets.release(self.volume)
        elif frame.reason == pw.GoodbyeReason.PAUSED:
            self.targets.paused(self.volume)
        link.close(f"source said goodbye: {frame.reason.name} {frame.message}".strip())

    _APPLY: ClassVar[dict[type, Callable[[TargetSession, PeerLink, int, pw.Frame], None]]] = {
        pw.Write: _write,
        pw.ResyncData: _write,
        pw.WriteCompressed: _write_compressed,
        pw.ResyncCompressed: _write_compressed,
        pw.Zero: _zero,
        pw.Trim: _trim,
        pw.Flush: _flush,
        pw.State: _state,
        pw.Job: _job,
        pw.HashRequest: _hash_request,
        pw.Ping: _ping,
        pw.Goodbye: _goodbye,
        pw.Handover: _handover,
    }


def _logged(what: str) -> Callable[[object, BaseException | None], None]:
    def done(result: object, error: BaseException | None) -> None:
        if error is not None:
            log.error(f"{what} failed", error=str(error))

    return done
