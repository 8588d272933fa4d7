"""Switchover: the planned reversal of a job, from its source node to one of its targets.

How this works, on the old source (``switchover``):

1. check: each mirror to the chosen node is Mirroring (else refused, naming its state); the
   job's record turns round (daemon/roles/handover.py).
2. fence: each source volume is locked (writes refused, new NBD connections read-only) and
   its clients detached: requests in flight finish and are answered, then each closes.
3. drain: a flush through each volume's write path, durable on every connected target;
   then every mirror of the job stops.  The mirrors to the new source must have nothing
   marked (something failed during the drain otherwise: refused); the others' marks travel.
4. hand over: a short session with the new source -- the HELLO of the mirror to it, then
   HANDOVER.  Its ACK is the commit point: the new source is the job's source on disk.
5. become a target: each source volume gets a target record naming the new source
   (UpToDate, the generations of the mirror to it) and stays locked; the job's record and
   intent logs go.  The session closes, the new source starts its mirrors, and their first
   HELLO finds this node a target already.  Other targets take the new source for the
   same job's (daemon/target/targets.py: a sibling the job's record names).

Before the commit point a failure changes nothing: the mirrors restart and the volumes
unlock.  A HANDOVER never answered leaves the outcome unknown: the mirrors restart but the
volumes stay locked until the mirror to the would-be source is admitted again (it did not
take over: unlock) or is refused with SOURCE_MOVED (it did).

A crash at step 5 leaves this node believing it is still the source: ``reconcile`` at
start keeps the record of the later epoch, and a mirror refused with SOURCE_MOVED makes it
a target (daemon/roles/failover.py).  The new source's side is daemon/roles/takeover.py.
A target node may ask for the job (a SWITCHOVER frame: ``requested``, ``ask``), and the
cluster manager may ``demote`` a source (fenced, drained, waiting) and ``activate`` it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import structlog

from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.daemon.roles import steps
from volkeeper.daemon.roles.handover import HandedMirror, Handover, packed_image, turned_round
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.source.peer_session import Refused, Undecided, hand_over
from volkeeper.daemon.target.target_record import TargetRecord
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.errors import PeerError, Refusal
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.nbd_server import NbdServer
from volkeeper.io.peer_link import PeerLink

log = structlog.get_logger("volkeeper.roles")

DRAIN_TIMEOUT = 30.0  # the flush that drains every mirror of the job
ASK_TIMEOUT = 60.0  # a target that asked for the job waits this long for it
BUSY_RETRIES = 20  # the new source may still hold the old mirror's connection a moment
BUSY_PAUSE = 0.02


class Switchover:
    def __init__(self, node: str, jobs: Jobs, targets: TargetVolumes, nbd: NbdServer) -> None:
        self.node = node
        self.jobs = jobs
        self.targets = targets
        self.nbd = nbd
        self.undecided: dict[str, str] = {}  # job -> node a HANDOVER went to, unanswered
        self._tasks: set[asyncio.Task[None]] = set()
        jobs.state_observers.append(self._decided)
        jobs.mirrors.on_switchover_request = self.requested

    def reconcile(self) -> None:
        """At start, before the jobs load: a switchover a crash cut short leaves a job
        recorded here both as source and as target; the record of the later epoch stands."""
        records, _ = self.jobs.store.load_all()
        for record in records:
            for volume in steps.source_volumes(record):
                target = self.targets.records.get(volume)
                if target is None or target.job != record.name:
                    continue
                document = target.job_record()
                if document is not None and document.epoch > record.epoch:
                    log.warning("job handed over before a crash: its record here goes",
                                job=record.name, source=target.source_node)  # fmt: skip
                    self.jobs.store.remove(record.name)
                    for mirror in record.mirrors:
                        self.jobs.logs.remove(record.name, mirror.target)
                    break
                log.warning("job taken over before a crash: its target record goes",
                            job=record.name, volume=volume)  # fmt: skip
                self.targets.promoted(volume)

    # -- the old source -------------------------------------------------------------------

    async def switchover(self, name: str, to: str) -> dict[str, Any]:
        started = time.monotonic()
        async with self.jobs.changing:
            record = self.jobs.record(name)
            if record.declared:
                raise Refusal(
                    "conflict", f"job {name!r} is declared in {self.node}'s config file, as "
                    f"its source", "change the [[job]] table's source to the new node (on "
                    "every node) and reload instead, or create the job through the API",
                )  # fmt: skip
            turned, places = turned_round(record, to)
            self._check_in_sync(record, to)
            await steps.fence(self.jobs, self.nbd, record, f"switching over to {to}")
            stores = await self._drain_and_stop(record, to)
            try:
                handover = self._handover(record, turned, places, stores)
                link = await self._hand_over(record, to, handover, stores)
            except Undecided as exc:
                self._restart(record, unlock=False)
                self.undecided[name] = to
                raise Refusal(
                    "unavailable", f"switchover of job {name!r} undecided: {exc}",
                    f"the volumes stay locked until {to} answers again",
                ) from None  # fmt: skip
            except (Refusal, PeerError) as exc:
                self._restart(record, unlock=True)
                if isinstance(exc, Refusal):
                    raise
                raise Refusal("conflict", f"switchover of job {name!r} failed: {exc}") from None
            self._become_target(record, turned, to, stores)
            link.close("switchover done")
        seconds = time.monotonic() - started
        log.info("switchover done", job=name, to=to, seconds=round(seconds, 3))
        self.jobs.publish("change", "job", job=name, role="target", source_node=to,
                          cause="switchover")  # fmt: skip
        return {"job": name, "old_source": self.node, "new_source": to, "seconds": seconds,
                "mirrors": [m.target for m in turned.mirrors]}  # fmt: skip

    def _check_in_sync(self, record: JobRecord, to: str) -> None:
        for mirror in record.mirrors:
            if mirror.target_node != to:
                continue
            running = self.jobs.mirrors.get((record.name, mirror.target))
            state = running.state if running is not None else None
            if state is not MirrorState.MIRRORING:
                shown = state.value if state is not None else "not running"
                raise Refusal(
                    "conflict",
                    f"cannot switch job {record.name!r} over to {to}: its mirror to "
                    f"{mirror.target} is {shown}, not Mirroring",
                    "wait until it is Mirroring (a resync must finish first)",
                )

    async def _drain_and_stop(self, record: JobRecord, to: str) -> dict[str, IntentStore]:
        """Drain, then stop every mirror of the job; their logs, closed."""
        await self.jobs.mirrors.drain(steps.source_volumes(record), DRAIN_TIMEOUT)
        stores = await steps.stop_mirrors(self.jobs, record)
        for mirror in record.mirrors:
            if mirror.target_node != to:
                continue
            store = stores.get(mirror.target)
            marked = store.bitmap.marked_bytes if store is not None else None
            if marked != 0:
                self._restart(record, unlock=True)
                raise Refusal(
                    "conflict",
                    f"switchover of job {record.name!r} stopped: after the drain the mirror "
                    f"to {mirror.target} still owes {marked} bytes (its link failed?)",
                    "wait until it is Mirroring again, then retry",
                )
        return stores

    def _handover(
        self,
        record: JobRecord,
        turned: JobRecord,
        places: dict[str, str],
        stores: dict[str, IntentStore],
    ) -> Handover:
        handed = []
        for mirror in turned.mirrors:
            old = stores.get(places[mirror.target])
            if old is None:  # a mirror that was not running: nothing known of its target
                raise Refusal(
                    "conflict",
                    f"the mirror of job {record.name!r} to {places[mirror.target]} is not "
                    "running: its marked regions cannot be handed over",
                )
            generations = old.generations
            image = packed_image(old.bitmap.to_bytes())
            size = old.bitmap.volume_size
            handed.append(
                HandedMirror(mirror.target, size, generations.current, generations.previous, image)
            )
        return Handover(self.node, turned, tuple(handed))

    async def _hand_over(
        self, record: JobRecord, to: str, handover: Handover, stores: dict[str, IntentStore]
    ) -> PeerLink:
        """The HANDOVER, in a session opened with the HELLO of the mirror to ``to``."""
        mirror = next(m for m in record.mirrors if m.target_node == to)
        generations = stores[mirror.target].generations
        target = self.jobs.mirrors.target(record.name, mirror, generations, record.epoch)
        frame = pw.Handover(handover.to_json())
        for _ in range(BUSY_RETRIES - 1):
            try:
                return await hand_over(target.address, to, target.hello, frame,
                                       trust=self.jobs.trust)  # fmt: skip
            except Refused as exc:
                if exc.refusal.reason != pw.RefuseReason.BUSY:
                    raise
            await asyncio.sleep(BUSY_PAUSE)
        return await hand_over(target.address, to, target.hello, frame, trust=self.jobs.trust)

    def _restart(self, record: JobRecord, unlock: bool) -> None:
        for mirror in record.mirrors:
            if (record.name, mirror.target) not in self.jobs.mirrors.running:
                self.jobs.load_mirror(record.name, mirror)
        if unlock:
            for volume in steps.source_volumes(record):
                self.jobs.services[volume].unlock()

    def _become_target(
        self, record: JobRecord, turned: JobRecord, to: str, stores: dict[str, IntentStore]
    ) -> None:
        """The new source committed: each source volume is its target from now on."""
        document = turned.to_json()
        for mirror in record.mirrors:
            if mirror.target_node != to:
                continue
            generations = stores[mirror.target].generations
            self.targets.become_target(
                mirror.source_volume,
                TargetRecord(
                    record.name, to, mirror.target_volume, pw.DataState.UP_TO_DATE.name,
                    generations.current, generations.previous, document,
                ),
            )  # fmt: skip
        self.jobs.forget(record.name)

    # -- the undecided and the deposed --------------------------------------------------

    def _decided(self, mirror: Mirror, was: MirrorState, cause: MirrorEvent) -> None:
        """The would-be new source admitted our mirror again: it did not take over."""
        job = mirror.spec.job
        if self.undecided.get(job) == mirror.spec.target_node and mirror.state in (
            MirrorState.MIRRORING, MirrorState.RESYNCING,
        ):  # fmt: skip
            del self.undecided[job]
            record = self.jobs.records.get(job)
            for volume in steps.source_volumes(record) if record else ():
                self.jobs.services[volume].unlock()
            log.warning("switchover did not happen: the job stays here", job=job)

    # -- asked by a target, or by the cluster manager ------------------------------------

    def requested(self, mirror: Mirror) -> None:
        """A target asked for the job (SWITCHOVER): hand it over, if it may be."""
        job, to = mirror.spec.job, mirror.spec.target_node

        async def run() -> None:
            try:
                await self.switchover(job, to)
            except Refusal as exc:
                log.warning("switchover asked by the target refused", job=job, to=to,
                            why=str(exc))  # fmt: skip

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ask(self, name: str, to: str) -> dict[str, Any]:
        """On a target node: ask the job's source to hand the job over to this node, and
        wait until it did."""
        started = time.monotonic()
        served = sorted((v, r) for v, r in self.targets.records.items() if r.job == name)
        if not served:
            raise Refusal("not_found", f"no job named {name!r} on {self.node}")
        volume, record = served[0]
        if to != self.node:
            raise Refusal(
                "conflict", f"job {name!r} has its source on {record.source_node}",
                f"run the switchover on {record.source_node} or on {to}",
            )  # fmt: skip
        session = self.targets.sessions.get(volume)
        if session is None or session.link is None or not session.link.is_open:
            raise Refusal(
                "conflict", f"{self.node}:{volume} is not connected to its source "
                f"{record.source_node}: a switchover needs it",
                f"if {record.source_node} is gone for good, fail over: "
                f"volkeeper volume promote {volume}",
            )  # fmt: skip
        session.link.send(pw.SwitchoverRequest())
        while time.monotonic() < started + ASK_TIMEOUT:
            current = self.jobs.records.get(name)
            if current is not None and self.jobs.services[volume].lock_reason is None:
                return {"job": name, "old_source": record.source_node, "new_source": self.node,
                        "seconds": time.monotonic() - started,
                        "mirrors": [m.target for m in current.mirrors]}  # fmt: skip
            await asyncio.sleep(0.02)
        raise Refusal(
            "unavailable", f"{record.source_node} did not hand job {name!r} over",
            f"its log says why: volkeeper events --node (the control address of "
            f"{record.source_node})",
        )  # fmt: skip

    async def demote(self, name: str) -> JobRecord:
        """The cluster manager demoted this source: no writes (fenced, drained) until
        another node takes the job over or it is promoted again; kept over restarts."""
        async with self.jobs.changing:
            record = self.jobs.record(name)
            if not record.demoted:
                await steps.fence(self.jobs, self.nbd, record, _demoted(name))
                await self.jobs.mirrors.drain(steps.source_volumes(record), DRAIN_TIMEOUT)
                record = self._save(dataclasses.replace(record, demoted=True))
                self.jobs.publish("change", "job", job=name, demoted=True)
            return record

    async def activate(self, name: str) -> JobRecord:
        """Promoted again where it was demoted: take writes."""
        async with self.jobs.changing:
            record = self.jobs.record(name)
            if record.demoted:
                record = self._save(dataclasses.replace(record, demoted=False))
                for volume in steps.source_volumes(record):
                    self.jobs.services[volume].unlock()
                self.jobs.publish("change", "job", job=name, demoted=False)
            return record

    def relock_demoted(self) -> None:
        """At start, after the jobs load: a demoted source stays without writes."""
        for record in self.jobs.records.values():
            if record.demoted:
                for volume in steps.source_volumes(record):
                    self.jobs.services[volume].lock(_demoted(record.name))

    def _save(self, record: JobRecord) -> JobRecord:
        self.jobs.store.save(record)
        self.jobs.records[record.name] = record
        return record


def _demoted(job: str) -> str:
    return f"demoted (job {job!r}): waiting for another node to take it over"
