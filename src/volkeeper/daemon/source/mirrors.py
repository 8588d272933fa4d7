"""The mirrors a source node runs: each one's task, and the write path its volume shares.

How this works: ``start`` builds a ``Mirror`` (daemon/source/mirror.py) from a job's mirror record
and its intent log, attaches it to its source volume's ``Replication`` (created with the
volume's first mirror: from then on every NBD write of the volume passes through it) and
runs it as a task.  ``stop`` takes it off the write path first, lets the ops it already has
finish, then stops it (saying ``goodbye`` to a connected target) and closes its intent log;
the volume's last mirror takes the ``Replication`` with it.  A recorded mirror that cannot
run (its peer or volume is no longer configured, its intent log is unreadable) is kept in
``problems`` so status can say why.  What a mirror is is the job's business (daemon/jobs/jobs.py);
this module only runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import MirrorRecord
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.source.mirror_spec import MirrorSpec, hello_for
from volkeeper.daemon.source.peer_session import Target
from volkeeper.daemon.source.replication import Replication
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.peer_trust import PeerTrust
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.jobs")

STOP_SYNC_TIMEOUT = 10.0
DRAIN_TIMEOUT = 10.0
COMPRESSION_THREADS = 2  # the codecs release the GIL: one per core here
ADMIN_STATES = {"paused": MirrorState.PAUSED, "broken": MirrorState.BROKEN}

Key = tuple[str, str]  # (job, target NODE:VOLUME)
OnState = Callable[[Mirror, MirrorState, MirrorEvent], None]
OnTargetError = Callable[[Mirror, str], None]


@dataclass
class RunningMirror:
    mirror: Mirror
    task: asyncio.Task[None]


class Mirrors:
    def __init__(
        self,
        node: str,
        peers: dict[str, TcpAddress],
        services: dict[str, VolumeService],
        readers: IoWorkers,
        trust: PeerTrust | None,
        on_state: OnState,
        on_target_error: OnTargetError,
        peer_timeout: float,
    ) -> None:
        self.node = node
        self.peers = peers
        self.services = services
        self.readers = readers
        self.trust = trust  # how to reach each peer safely (None: plain TCP, tests)
        self.on_state = on_state
        self.on_target_error = on_target_error
        self.peer_timeout = peer_timeout  # [node] peer_timeout: every mirror drops a silent target
        self.on_deposed: Callable[[Mirror, str], None] = lambda *_: None  # set by the node
        self.on_switchover_request: Callable[[Mirror], None] = lambda *_: None
        self.compressors = IoWorkers(COMPRESSION_THREADS, "volkeeper-compress")
        self.running: dict[Key, RunningMirror] = {}
        self.problems: dict[Key, str] = {}  # recorded mirrors that could not start
        self.locked: dict[Key, VolumeService] = {}  # source volumes they locked
        self.replications: dict[str, Replication] = {}  # source volume ->

    def problem(self, record: MirrorRecord) -> str | None:
        """Why ``record``'s mirror cannot run on this node as configured, if it cannot."""
        if record.target_node not in self.peers:
            return f"node {record.target_node!r} is not in [peers]"
        if record.source_volume not in self.services:
            return f"no volume {record.source_volume!r} on this node"
        return None

    def start(
        self,
        job: str,
        record: MirrorRecord,
        store: IntentStore,
        document: Callable[[], str],
        notice: str | None = None,
        epoch: int = 0,
    ) -> None:
        """Run ``record``'s mirror; ``document`` gives the job's record for its target;
        ``notice`` (what opening its intent log found) stands as its last error until a
        resync completes."""
        problem = self.problem(record)
        if problem is not None:
            store.close()
            self.cannot_start(job, record, problem)
            return
        service = self.services[record.source_volume]
        spec = self.spec(job, record)
        state = ADMIN_STATES.get(record.admin, MirrorState.RESYNC_PENDING)
        mirror = Mirror(
            spec, self.node, service, store, self.readers, self.compressors, self.trust, state,
            peer_timeout=self.peer_timeout,
        )  # fmt: skip
        mirror.job_document = document
        mirror.epoch = epoch
        if notice is not None:
            mirror.engine.stand(notice)
        mirror.on_state = self.on_state
        mirror.on_target_error = self.on_target_error
        mirror.on_deposed = self.on_deposed
        mirror.on_switchover_request = self.on_switchover_request
        replication = self.replications.get(service.name)
        if replication is None:
            replication = self.replications[service.name] = Replication(service)
            service.replication = replication
            replication.start()
        replication.add(mirror)
        self.running[(job, spec.target)] = RunningMirror(mirror, asyncio.create_task(mirror.run()))

    def cannot_start(
        self, job: str, record: MirrorRecord, problem: str, lock: VolumeService | None = None
    ) -> None:
        """Record why a mirror is not running; ``lock`` its source volume (read-only) when
        writes to it would not be tracked for the target."""
        log.error("mirror not started", job=job, target=record.target, problem=problem)
        self.problems[(job, record.target)] = problem
        if lock is not None:
            lock.lock(f"its mirror to {record.target} cannot track writes: {problem}")
            self.locked[(job, record.target)] = lock

    async def stop(self, key: Key, goodbye: pw.GoodbyeReason | None) -> bool:
        """Take the mirror off the write path and stop it; True if the target heard
        ``goodbye`` (it was connected)."""
        self.problems.pop(key, None)
        locked = self.locked.pop(key, None)
        if locked is not None:
            locked.unlock()
        running = self.running.pop(key, None)
        if running is None:
            return False
        mirror = running.mirror
        replication = self.replications[mirror.spec.source_volume]
        replication.detach(mirror)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replication.drained(mirror), DRAIN_TIMEOUT)
        told = mirror.link is not None and mirror.link.is_open and goodbye is not None
        await mirror.stop(goodbye)
        running.task.cancel()
        await asyncio.gather(running.task, return_exceptions=True)
        if not replication.mirrors:
            await replication.stop()
            while replication.in_flight:
                await asyncio.sleep(0.01)
            replication.service.replication = None
            del self.replications[mirror.spec.source_volume]
        mirror.close()
        return told

    async def drain(self, volumes: Iterable[str], timeout: float) -> None:
        """Flush each source volume through its mirrors, durable on every connected target
        (so nothing written so far is resent), waiting ``timeout`` at most for each."""
        for volume in volumes:
            replication = self.replications.get(volume)
            if replication is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(replication.sync(), timeout)

    async def stop_all(self) -> None:
        """Node shutdown: a last sync of every source volume, then every mirror stops."""
        await self.drain(list(self.replications), STOP_SYNC_TIMEOUT)
        for key in list(self.running):
            await self.stop(key, None)
        self.compressors.shutdown()

    def get(self, key: Key) -> Mirror | None:
        running = self.running.get(key)
        return running.mirror if running is not None else None

    def spec(self, job: str, record: MirrorRecord) -> MirrorSpec:
        return MirrorSpec(
            job, record.source_volume, record.target_node, self.peers[record.target_node],
            record.target_volume, record.settings,
        )  # fmt: skip

    def target(
        self, job: str, record: MirrorRecord, generations: Generations, epoch: int
    ) -> Target:
        """Where a short session about ``record``'s mirror goes, and its HELLO."""
        spec = self.spec(job, record)
        service = self.services[record.source_volume]
        hello = hello_for(spec, self.node, service, generations, epoch)
        return Target(spec.target_address, spec.target_node, hello)

    def reconfigure(self, job: str, record: MirrorRecord, reconnect: bool = False) -> None:
        """New settings for a running mirror (and, if its node moved, a new connection)."""
        mirror = self.get((job, record.target))
        if mirror is not None and record.target_node in self.peers:
            mirror.configure(self.spec(job, record))
            if reconnect:
                mirror.drop_link("the target node's address changed")
