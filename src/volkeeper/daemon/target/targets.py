"""The node's target volumes: who may feed them, what is known of them, and their locks.

How this works: ``TargetVolumes`` holds every target volume of the node and the session
(``target_session.TargetSession``) feeding each one, if any.  A session passes its source's HELLO to
``admit``, which checks it against the node: the volume exists, has the source's sector size
and at least its size, and is not already the target of another mirror nor fed by another
live connection (one whose source fell silent is closed after the node's ``peer_timeout``:
target_session.py), nor the source of a mirror here (a HELLO for a volume that is a job's
source here is judged by the node's role changes: ``judge``, daemon/roles/failover.py).  A
HELLO from another target of the same job, one epoch later, as the job's record kept here
names it, is that copy become the job's source (a switchover or failover): the record
follows it.  The first HELLO for a volume claims it: a
``TargetRecord`` is written (durably, before the answer) and the volume is locked, so its NBD
export refuses writes from then on (DESIGN invariant 4).  A GOODBYE(DELETED) from the source,
or the administrator's ``forget`` when the source cannot say so any more, releases the volume
(``release``): the record goes, the lock goes, the data stays as it is.  Every change of a
target's state is published as an event (``changed``).

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
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from volkeeper.core.mirror_engine import DEFAULT_PEER_TIMEOUT
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.target import target_session
from volkeeper.daemon.target.target_record import TargetRecord, TargetRecords
from volkeeper.daemon.target.target_view import target_view
from volkeeper.errors import Refusal
from volkeeper.io.limits import Limits
from volkeeper.io.peer_link import PeerLink
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.target")


class TargetVolumes:
    """Every target volume of the node, and the sessions currently feeding them."""

    def __init__(
        self,
        node: str,
        service: Callable[[str], VolumeService | None],
        records: TargetRecords,
        publish: Callable[..., None] | None = None,
        peer_timeout: float = DEFAULT_PEER_TIMEOUT,
    ) -> None:
        self.node = node
        self.service = service
        self.store = records
        self.publish = publish or _ignore
        self.peer_timeout = peer_timeout  # [node] peer_timeout: a silent source is dropped
        self.lost_at: dict[str, float] = {}  # target volume -> when its source left (time())
        # Set by the node (daemon/roles/): the refusal of a HELLO for a volume that is a
        # job's source here (None: it is none), and the taking over of a job.
        self.judge: Callable[[pw.Hello], pw.Refuse | None] = lambda hello: None
        # Set by the node (io/peer_trust.py): why a HELLO naming this source node must be
        # refused on this link (unauthenticated, or another node's identity); None: admit.
        self.vouch: Callable[[str, PeerLink], str | None] = _trust_nobody
        self.limits = Limits()  # the node's (io/limits.py): a source's queue is bounded
        self.adopt: Adopt = _cannot_adopt
        self._shown: dict[str, str] = {}  # target volume -> state last published
        self.records = records.load_all()
        self.sessions: dict[str, target_session.TargetSession] = {}
        self.received_bytes: dict[str, int] = {}  # target volume -> payload bytes received
        self.errors: dict[str, str] = {}  # target volume -> last frame it could not apply
        self.error_counts: dict[str, int] = {}  # target volume -> frames it could not apply
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
        session = target_session.TargetSession(self)
        link = PeerLink(session.on_frame, session.on_lost)
        asyncio.get_running_loop().call_later(target_session.HELLO_TIMEOUT, session.expire, link)
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
        elif (record.source_node, record.source_volume) != (hello.node, hello.source_volume):
            was = record.mirror  # a sibling target took the job over (_check)
            moved = dataclasses.replace(
                record, source_node=hello.node, source_volume=hello.source_volume
            )
            record = self._save(hello.volume, moved)
            log.info("mirror source moved", volume=hello.volume, was=was, mirror=record.mirror)
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

    # -- frames that could not be applied ----------------------------------------------------

    def failed(self, volume: str, message: str) -> TargetRecord | None:
        """A frame for ``volume`` failed: keep ``message`` for status and publish it; the copy
        is Inconsistent now.  Returns the downgraded record for the caller to save (in the
        volume's FIFO), or None when the record said no better already."""
        self.errors[volume] = message
        self.error_counts[volume] = self.error_counts.get(volume, 0) + 1
        self.publish("change", "volume", volume=volume, role="target", error=message)
        record = self.records.get(volume)
        if record is None or record.data_state in _NOT_BETTER_THAN_INCONSISTENT:
            return None
        record = dataclasses.replace(record, data_state=pw.DataState.INCONSISTENT.name)
        self.records[volume] = record
        self.changed(volume)
        return record

    def recovered(self, volume: str) -> None:
        """The source's resync completed and ``volume`` recorded UpToDate: errors are past."""
        if self.errors.pop(volume, None) is not None:
            log.info("mirror target recovered", volume=volume)

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
            raise Refusal("conflict", f"cannot unlock {where}: {connected}", hint)
        if not record.paused:
            raise Refusal(
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
            raise Refusal("not_found", f"node {self.node} has no volume {volume!r}")
        if record is None:
            raise Refusal("conflict", f"{self.node}:{volume} is not a mirror target")
        return record, service

    def forget(self, volume: str) -> None:
        """The administrator's release of a target whose source cannot say so any more."""
        record, _ = self._target(volume)
        if volume in self.sessions:
            raise Refusal(
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
        return [
            target_view(self.node, volume, record, self._state(volume, record), {
                "received_bytes": self.received_bytes.get(volume, 0),
                "source_lost_at": None if volume in self.sessions else self.lost_at.get(volume),
                "last_error": self.errors.get(volume),
                "target_errors": self.error_counts.get(volume, 0),
            })
            for volume, record in self.records.items()
        ]  # fmt: skip

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
        judged = self.judge(hello)
        if judged is not None:
            return judged
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
        if (
            record is not None
            and (record.job, record.source_node, record.source_volume)
            != (
                hello.job,
                hello.node,
                hello.source_volume,
            )
            and not _sibling(record, hello)
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

    # -- role changes (daemon/roles/switchover.py) -------------------------------------------

    def become_target(self, volume: str, record: TargetRecord) -> None:
        """This node handed the job over: ``volume`` is a target of the new source now."""
        self._save(volume, record)
        service = self.service(volume)
        if service is not None:
            service.lock(f"target of mirror {record.mirror}")

    def promoted(self, volume: str, lock: str | None = None) -> None:
        """``volume`` is the source of its job now: no target record; locked for ``lock``,
        if given, else unlocked."""
        self._drop(volume, lock)

    def release(self, volume: str) -> None:
        """The source deleted the mirror: unlock the volume, keep its data."""
        self._drop(volume, None)
        log.info("mirror target released", volume=volume)

    def _drop(self, volume: str, lock: str | None) -> None:
        """Forget ``volume``'s record (durably) and its state here; lock it for ``lock``,
        or unlock it."""
        record = self.records.pop(volume, None)
        self._unlocked_at.pop(volume, None)
        self._shown.pop(volume, None)
        self.store.remove(volume)
        if record is not None:
            target = f"{self.node}:{volume}"
            self.publish("destroy", "mirror", job=record.job, role="target", target=target)
        service = self.service(volume)
        if service is not None and lock is not None:
            service.lock(lock)
        elif service is not None:
            service.unlock()


def _sibling(record: TargetRecord, hello: pw.Hello) -> bool:
    """``hello`` comes from another target of the same job, as the job's record kept here
    names it: that copy became the job's source (a switchover or failover)."""
    job = record.job_record()
    if job is None or job.name != hello.job or hello.job != record.job:
        return False
    later = hello.epoch > job.epoch  # a node deposed since cannot come back this way
    return later and job.mirror(f"{hello.node}:{hello.source_volume}") is not None


_NOT_BETTER_THAN_INCONSISTENT = {pw.DataState.INCONSISTENT.name, pw.DataState.OUTDATED.name}


def _mutations(service: VolumeService) -> int:
    """Write, zero and trim requests the volume has served over NBD."""
    ops = service.stats.ops
    return ops["write"].requests + ops["zero"].requests + ops["trim"].requests


def _trust_nobody(node: str, link: PeerLink) -> str | None:
    return f"this node has no trusted peers yet; {node} was not admitted"


def _ignore(*args: object, **fields: object) -> None:
    return None


Adopt = Callable[[str, str], Awaitable[Callable[[], None]]]


async def _cannot_adopt(volume: str, document: str) -> Callable[[], None]:
    raise Refusal("conflict", "this node takes no jobs over")
