"""The target end of mirrors: admit a source's connection, then apply its frames in order.

How this works: every connection to the node's replication port gets a ``ReplicaSession``.
Its first frame must be a HELLO, which ``admit`` checks against the node: the volume exists,
has the source's sector size and at least its size, and is not already the target of another
mirror nor fed by another live connection, nor the source of a mirror here.  A connection
that says nothing is closed after ``HELLO_TIMEOUT``.  Over TLS, the source's certificate must
name the node its HELLO claims to be.  The first HELLO for a volume claims it: a
``TargetRecord`` is written (durably, before the answer) and the volume is locked, so its NBD
export refuses writes from then on (DESIGN invariant 4).  The answer is HELLO_OK with what
the record says of this copy (data state, generations), or REFUSE naming the reason.

After that the session applies WRITE, RESYNC_DATA, ZERO, TRIM and FLUSH frames through the
volume's writer thread -- one FIFO -- so they reach the disk in the order the source sent them
(invariant 1), and ACKs each with its sequence number once done; a FLUSH's ACK carries
DURABLE. A small write that arrives while that thread has nothing queued is copied to the page
cache on the loop instead (as on the NBD path): nothing earlier is pending, so the order
holds, and its ACK leaves with the others of the same receive. A STATE frame rewrites the
record through the same FIFO, so "UpToDate" is recorded only after every earlier write. A
GOODBYE(DELETED) releases the volume: the record goes, the lock goes, the data stays as it is.
Anything out of place closes that session only. When the node stops cleanly, each session
flushes its volume and says GOODBYE(SHUTDOWN) first.

Records live in ``state_dir/targets/VOLUME.json`` and are written atomically (temporary
file, fsync, rename, fsync of the directory), so a target that restarts knows its locks.  A
record also keeps the job's document (the JOB frame the source sends after HELLO_OK and on
every change), so this node can answer for the job, and whether the source said the mirror
is paused: only then may the administrator unlock the volume by hand (``unlock``).  Writes to
an unlocked target make its copy differ from the source in ways no intent log tracks, so the
lock that ends it (by hand, or the source's next HELLO) invalidates the record's generation
when anything was written (or the node restarted while unlocked): the next resync is a full
one, which overwrites the target's own changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import structlog

from volkeeper.core import peer_wire as pw
from volkeeper.daemon.job_record import JobError, JobRecord
from volkeeper.errors import ProtocolError, VolumeError
from volkeeper.io import durable_files
from volkeeper.io.codecs import decompress
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.replica")

SHUTDOWN_FLUSH_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0  # a connection that has not said HELLO by then is closed


@dataclasses.dataclass
class TargetRecord:
    job: str
    source_node: str
    source_volume: str
    data_state: str = pw.DataState.INCONSISTENT.name
    current_generation: int = 0
    previous_generation: int = 0
    job_document: str = ""  # the job's record as the source last sent it (JSON)
    paused: bool = False  # the source said GOODBYE(PAUSED) and has not come back since
    unlocked: bool = False  # the administrator unlocked the volume (while paused)

    @property
    def mirror(self) -> str:
        return f"job {self.job!r} from {self.source_node}:{self.source_volume}"

    def job_record(self) -> JobRecord | None:
        try:
            return JobRecord.from_json(self.job_document) if self.job_document else None
        except ValueError:
            return None


class TargetRecords:
    """The durable list of this node's target volumes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load_all(self) -> dict[str, TargetRecord]:
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            records[path.stem] = TargetRecord(**json.loads(path.read_text()))
        return records

    def save(self, volume: str, record: TargetRecord) -> None:
        durable_files.write_json(self.directory / f"{volume}.json", dataclasses.asdict(record))

    def remove(self, volume: str) -> None:
        durable_files.remove(self.directory / f"{volume}.json")


class Replicas:
    """Every target volume of the node, and the sessions currently feeding them."""

    def __init__(
        self,
        node: str,
        service: Callable[[str], VolumeService | None],
        records: TargetRecords,
        publish: Callable[..., None] | None = None,
    ) -> None:
        self.node = node
        self.service = service
        self.store = records
        self.publish = publish or _ignore
        self._shown: dict[str, str] = {}  # target volume -> state last published
        self.records = records.load_all()
        self.sessions: dict[str, ReplicaSession] = {}
        self.received_bytes: dict[str, int] = {}  # target volume -> payload bytes received
        # unlocked target volume -> its mutating requests when unlocked (None: unknown, as
        # after a restart while unlocked -- taken as "written")
        self._unlocked_at: dict[str, int | None] = {}
        for volume, record in self.records.items():
            found = service(volume)
            if found is None:
                continue
            if record.unlocked:
                self._unlocked_at[volume] = None
            else:
                found.lock(f"target of mirror {record.mirror}")

    def make_link(self) -> PeerLink:
        session = ReplicaSession(self)
        link = PeerLink(session.on_frame, session.on_lost)
        asyncio.get_running_loop().call_later(HELLO_TIMEOUT, session.expire, link)
        return link

    def admit(self, hello: pw.Hello) -> tuple[VolumeService, TargetRecord] | pw.Refuse:
        """Check a HELLO; claim the volume on its first HELLO.  Blocks briefly (one fsync)."""
        refusal = self._check(hello)
        if isinstance(refusal, pw.Refuse):
            return refusal
        service = refusal
        record = self.records.get(hello.volume)
        if record is None:
            record = TargetRecord(hello.job, hello.node, hello.source_volume)
            self._save(hello.volume, record)
            log.info("volume claimed as mirror target", volume=hello.volume, mirror=record.mirror)
        elif record.unlocked:
            record = self.lock(hello.volume)
        if record.paused:
            record = self._save(hello.volume, dataclasses.replace(record, paused=False))
        service.lock(f"target of mirror {record.mirror}")
        return service, record

    def _save(self, volume: str, record: TargetRecord) -> TargetRecord:
        self.store.save(volume, record)
        self.records[volume] = record
        self.changed(volume)
        return record

    def changed(self, volume: str) -> None:
        """Publish the target-side state of ``volume``'s mirror if it changed."""
        record = self.records.get(volume)
        if record is None:
            return
        state, was = self._state(volume, record), self._shown.get(volume)
        if state != was:
            self._shown[volume] = state
            self.publish(
                "change" if was else "create", "mirror", job=record.job, role="target",
                source=f"{record.source_node}:{record.source_volume}",
                target=f"{self.node}:{volume}", state=state, was=was,
            )  # fmt: skip

    # -- the administrator's lock and unlock ------------------------------------------------

    def unlock(self, volume: str) -> TargetRecord:
        """Let the target volume be written here, while its mirror is Paused."""
        record, service = self._target(volume)
        if record.unlocked:
            return record
        where = f"{self.node}:{volume}"
        command = f"volkeeper mirror pause {record.job} --target {where}"
        hint = f"pause it on {record.source_node}: {command}"
        if volume in self.sessions:
            connected = f"{record.mirror} is connected (unlock only while Paused)"
            raise JobError("conflict", f"cannot unlock {where}: {connected}", hint)
        if not record.paused:
            raise JobError(
                "conflict",
                f"cannot unlock {where}: {record.mirror} is not Paused (its source may only be "
                "unreachable)",
                hint,
            )
        record = self._save(volume, dataclasses.replace(record, unlocked=True))
        self._unlocked_at[volume] = _mutations(service)
        service.unlock()
        log.warning(
            "mirror target unlocked by the administrator: writes here are overwritten by the "
            "next resync",
            volume=volume,
            mirror=record.mirror,
        )
        return record

    def lock(self, volume: str) -> TargetRecord:
        """End an unlock: written since -> the next resync is a full one."""
        record, service = self._target(volume)
        if not record.unlocked:
            return record
        baseline = self._unlocked_at.pop(volume, None)
        written = baseline is None or _mutations(service) != baseline
        record = dataclasses.replace(record, unlocked=False)
        if written:  # the copy no longer matches any generation of the source
            record = dataclasses.replace(
                record, current_generation=0, data_state=pw.DataState.INCONSISTENT.name
            )
        self._save(volume, record)
        service.lock(f"target of mirror {record.mirror}")
        log.info("mirror target locked again", volume=volume, written_while_unlocked=written)
        return record

    def _target(self, volume: str) -> tuple[TargetRecord, VolumeService]:
        record, service = self.records.get(volume), self.service(volume)
        if service is None:
            raise JobError("not_found", f"node {self.node} has no volume {volume!r}")
        if record is None:
            raise JobError("conflict", f"{self.node}:{volume} is not a mirror target")
        return record, service

    def forget(self, volume: str) -> None:
        """The administrator's release of a target whose source cannot say so any more."""
        record, _ = self._target(volume)
        if volume in self.sessions:
            raise JobError(
                "conflict", f"{self.node}:{volume} is connected to {record.mirror}",
                f"delete the mirror on {record.source_node} instead",
            )  # fmt: skip
        self.release(volume)

    def paused(self, volume: str) -> None:
        record = self.records.get(volume)
        if record is not None and not record.paused:
            self._save(volume, dataclasses.replace(record, paused=True))

    # -- views ------------------------------------------------------------------------------

    def views(self) -> list[dict[str, Any]]:
        """The mirrors this node is the target of, as far as it can tell."""
        return [self._view(volume, record) for volume, record in self.records.items()]

    def _view(self, volume: str, record: TargetRecord) -> dict[str, Any]:
        job = record.job_record()
        target = f"{self.node}:{volume}"
        settings = job.mirror(target) if job is not None else None
        received = self.received_bytes.get(volume, 0)
        return {
            "job": record.job,
            "source": f"{record.source_node}:{record.source_volume}",
            "target": target,
            "role": "target",
            "mode": settings.mode if settings is not None else None,
            "state": self._state(volume, record),
            "data_state": _DATA_STATE_NAMES[record.data_state],
            "out_of_sync_bytes": None,  # the source's intent log knows; ask it
            "sent_bytes": None,
            "wire_bytes": None,
            "compression_ratio": None,
            "received_bytes": received,
            "queue_bytes": None,
            "queue_limit_bytes": None,
            "lag_s": None,
            "throughput_bytes_per_s": None,
            "compression": settings.compression if settings is not None else None,
            "throttle": settings.throttle if settings is not None else None,
            "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
            "unlocked": record.unlocked,
            "last_error": None,
        }

    def _state(self, volume: str, record: TargetRecord) -> str:
        if volume in self.sessions:
            return "Mirroring" if record.data_state == "UP_TO_DATE" else "Resyncing"
        if record.paused:
            return "Paused"
        if record.data_state == "OUTDATED":
            return "Broken"
        return "Unknown"  # the source is not connected: only it knows

    def jobs(self) -> list[JobRecord]:
        """The jobs this node serves as a target, as their sources last described them."""
        found: dict[str, JobRecord] = {}
        for record in self.records.values():
            job = record.job_record()
            if job is not None:
                found.setdefault(job.name, job)
        return list(found.values())

    def _check(self, hello: pw.Hello) -> VolumeService | pw.Refuse:
        R = pw.RefuseReason
        if pw.choose_version(hello.min_version, hello.max_version, 1, pw.PROTOCOL_VERSION) is None:
            versions = f"{hello.min_version}..{hello.max_version}"
            return pw.Refuse(R.VERSION, f"protocol versions {versions} unsupported")
        service = self.service(hello.volume)
        where = f"{self.node}:{hello.volume}"
        if service is None:
            return pw.Refuse(R.NO_SUCH_VOLUME, f"node {self.node} has no volume {hello.volume!r}")
        if service.replication is not None:
            return pw.Refuse(
                R.IS_SOURCE,
                f"{where} is the source of a mirror here: it cannot be a target too",
            )
        volume = service.volume
        if volume.sector_size != hello.sector_size:
            return pw.Refuse(
                R.SECTOR_SIZE,
                f"{where} has {volume.sector_size}-byte sectors, the source {hello.sector_size}",
            )
        if volume.size < hello.volume_size:
            return pw.Refuse(
                R.SIZE,
                f"{where} is {volume.size} bytes, smaller than the source's {hello.volume_size}",
            )
        record = self.records.get(hello.volume)
        if record is not None and (record.job, record.source_node, record.source_volume) != (
            hello.job,
            hello.node,
            hello.source_volume,
        ):
            return pw.Refuse(R.ALREADY_TARGET, f"{where} is already the target of {record.mirror}")
        if hello.volume in self.sessions:
            return pw.Refuse(R.BUSY, f"{where} is already fed by another connection")
        return service

    async def shutdown(self) -> None:
        """Clean stop: make every acknowledged write durable, then say GOODBYE(SHUTDOWN), so
        sources know nothing they sent is lost and need not resend it."""
        await asyncio.gather(*(s.flush_and_leave() for s in list(self.sessions.values())))

    def received(self) -> list[tuple[str, str, int]]:
        """(target volume, source NODE:VOLUME, payload bytes received) for metrics."""
        count = self.received_bytes.get
        return [
            (volume, f"{record.source_node}:{record.source_volume}", count(volume, 0))
            for volume, record in self.records.items()
        ]

    def release(self, volume: str) -> None:
        """The source deleted the mirror: unlock the volume, keep its data."""
        record = self.records.pop(volume, None)
        self._unlocked_at.pop(volume, None)
        self._shown.pop(volume, None)
        self.store.remove(volume)
        if record is not None:
            target = f"{self.node}:{volume}"
            self.publish("destroy", "mirror", job=record.job, role="target", target=target)
        service = self.service(volume)
        if service is not None:
            service.unlock()
        log.info("mirror target released", volume=volume)


class ReplicaSession:
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.volume: str | None = None
        self.service: VolumeService | None = None
        self.record: TargetRecord | None = None
        self.link: PeerLink | None = None

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
        if self.volume is not None and self.replicas.sessions.get(self.volume) is self:
            del self.replicas.sessions[self.volume]
            self.replicas.changed(self.volume)

    def _handshake(self, link: PeerLink, frame: pw.Frame) -> None:
        if not isinstance(frame, pw.Hello):
            link.close(f"expected HELLO, got {frame.TYPE.name}")
            return
        names = link.certificate_names()
        if names is not None and frame.node not in names:
            shown = ", ".join(names) or "no DNS name"
            message = f"the TLS certificate names {shown}, not the source node {frame.node!r}"
            admitted: tuple[VolumeService, TargetRecord] | pw.Refuse = pw.Refuse(
                pw.RefuseReason.OTHER, message
            )
        else:
            admitted = self.replicas.admit(frame)
        if isinstance(admitted, pw.Refuse):
            log.warning("mirror source refused", source=frame.node, why=admitted.message)
            link.send(admitted)
            link.close(f"refused: {admitted.message}")
            return
        self.service, self.record = admitted
        self.volume = frame.volume
        self.link = link
        self.replicas.sessions[frame.volume] = self
        self.replicas.changed(frame.volume)
        volume = self.service.volume
        link.send(
            pw.HelloOk(
                node=self.replicas.node,
                volume=frame.volume,
                volume_size=volume.size,
                sector_size=volume.sector_size,
                current_generation=self.record.current_generation,
                previous_generation=self.record.previous_generation,
                data_state=pw.DataState[self.record.data_state],
            )
        )

    # -- applying frames in order: small writes inline while the writer is idle, else on it --

    def _submit(
        self,
        link: PeerLink,
        sequence: int,
        function: Callable[..., Any],
        *args: Any,
        durable: bool,
        recycle: pw.Buffer = b"",
    ) -> None:
        def done(result: object, error: BaseException | None) -> None:
            link.recycle(recycle)
            code = 0
            if isinstance(error, VolumeError):
                code = error.errno
                log.error("applying a mirror frame failed", sequence=sequence, error=str(error))
            elif isinstance(error, ProtocolError):  # compressed data that does not decompress
                code = errno.EBADMSG
                log.error("a mirror frame's data is corrupt", sequence=sequence, error=str(error))
            elif error is not None:
                code = 5
                log.error("applying a mirror frame crashed", sequence=sequence, error=repr(error))
            if link.is_open:
                link.send(pw.Ack(sequence, code, durable=durable and not code))

        assert self.service is not None
        self.service.submit(function, *args, mutating=True, on_done=done)

    def _write(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Write | pw.ResyncData) and self.service is not None
        service, data = self.service, frame.data
        received = self.replicas.received_bytes
        received[service.name] = received.get(service.name, 0) + len(data)
        if not frame.fua:  # a small write while the writer is idle: a page-cache copy, here
            try:
                done = service.try_write(frame.offset, data)
            except VolumeError as error:
                log.error("applying a mirror frame failed", sequence=sequence, error=str(error))
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
            durable=frame.fua, recycle=data,
        )  # fmt: skip

    def _write_compressed(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        """Decompressed on the volume's writer thread, in its place in the FIFO."""
        assert isinstance(frame, pw.WriteCompressed | pw.ResyncCompressed)
        service = self.service
        assert service is not None
        received = self.replicas.received_bytes
        received[service.name] = received.get(service.name, 0) + frame.raw_length

        def write() -> None:
            data = decompress(frame.codec, bytes(frame.data), frame.raw_length)
            service.write(frame.offset, data, frame.fua)

        self._submit(link, sequence, write, durable=frame.fua)

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

        def save() -> None:
            self.replicas.store.save(volume, record)

        self.record = self.replicas.records[volume] = record
        self.replicas.changed(volume)
        self._submit(link, sequence, save, durable=True)

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

    def _ping(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Ping)
        link.send(pw.Pong(frame.token))

    def _goodbye(self, link: PeerLink, sequence: int, frame: pw.Frame) -> None:
        assert isinstance(frame, pw.Goodbye) and self.volume is not None
        if frame.reason == pw.GoodbyeReason.DELETED:
            self.replicas.release(self.volume)
        elif frame.reason == pw.GoodbyeReason.PAUSED:
            self.replicas.paused(self.volume)
        link.close(f"source said goodbye: {frame.reason.name} {frame.message}".strip())

    _APPLY: ClassVar[dict[type, Callable[[ReplicaSession, PeerLink, int, pw.Frame], None]]] = {
        pw.Write: _write,
        pw.ResyncData: _write,
        pw.WriteCompressed: _write_compressed,
        pw.ResyncCompressed: _write_compressed,
        pw.Zero: _zero,
        pw.Trim: _trim,
        pw.Flush: _flush,
        pw.State: _state,
        pw.Job: _job,
        pw.Ping: _ping,
        pw.Goodbye: _goodbye,
    }


_DATA_STATE_NAMES = {
    "UP_TO_DATE": "UpToDate",
    "CONSISTENT": "Consistent",
    "INCONSISTENT": "Inconsistent",
    "OUTDATED": "Outdated",
}


def _mutations(service: VolumeService) -> int:
    """Write, zero and trim requests the volume has served over NBD."""
    ops = service.stats.ops
    return ops["write"].requests + ops["zero"].requests + ops["trim"].requests


def _ignore(*args: object, **fields: object) -> None:
    return None
