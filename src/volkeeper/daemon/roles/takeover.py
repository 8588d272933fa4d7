"""Taking a job over: the new source's side of a switchover (daemon/roles/switchover.py).

How this works: the HANDOVER's session (daemon/target/target_session.py) calls ``adopt``,
which checks the document against this node (it names this node the source; each new
source volume is an UpToDate target of the job here, of the old source's size; every target
is in [peers]), makes each mirror's intent log with the generations and marks handed over,
saves the job's record -- the commit point -- and turns its target records into source
volumes, still locked.  It returns ``start``, which the session calls once the old source,
a target now, closed it: the mirrors start, and the volumes take writes once every mirror
connected (nothing then is marked, nothing resent), or after ``CONNECT_WAIT`` if a target
is away (its writes are tracked).  A refusal changes nothing: the logs made are removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from volkeeper.core.bitmap import image_size
from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.daemon.roles import steps
from volkeeper.daemon.roles.handover import Handover
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.errors import Refusal
from volkeeper.io.intent_store import IntentStore

log = structlog.get_logger("volkeeper.roles")

CONNECT_WAIT = 2.0  # the new source takes writes by then even if a target is away


class Takeover:
    def __init__(self, node: str, jobs: Jobs, targets: TargetVolumes) -> None:
        self.node = node
        self.jobs = jobs
        self.targets = targets
        targets.adopt = self.adopt

    async def adopt(self, volume: str, document: str) -> Callable[[], None]:
        """Take the job a HANDOVER names over; returns what starts its mirrors.  Raises
        Refusal, having changed nothing, when it cannot."""
        try:
            handover = Handover.from_json(document)
        except ValueError as exc:
            raise Refusal("bad_request", str(exc)) from None
        record = handover.job
        async with self.jobs.changing:
            self._check_adoptable(volume, handover)
            stores: dict[str, IntentStore] = {}
            try:
                for mirror in record.mirrors:
                    handed = handover.mirror(mirror.target)
                    size = self.jobs.services[mirror.source_volume].volume.size
                    if size != handed.volume_size:
                        raise ValueError(
                            f"{self.node}:{mirror.source_volume} is {size} bytes, the source "
                            f"{handed.volume_size}: a switchover needs volumes of one size"
                        )
                    image = handed.image(image_size(size, mirror.settings.region_size))
                    store, named = self.jobs.logs.create(
                        record.name, mirror, size, handed.generations, image,
                        replace_leftover=True,
                    )  # fmt: skip
                    stores[mirror.target] = store
                    record = record.with_mirror(named)
                self.jobs.store.save(record)  # the commit point
            except (ValueError, OSError) as exc:
                for target, store in stores.items():
                    store.close()
                    self.jobs.logs.remove(record.name, target)
                raise Refusal("conflict", f"cannot take job {record.name!r} over: {exc}") from None
            self.jobs.records[record.name] = record
            taking = f"taking job {record.name!r} over from {handover.from_node}"
            for source_volume in steps.source_volumes(record):
                self.targets.promoted(source_volume, lock=taking)
            log.info("job taken over: this node is its source", job=record.name,
                     was=handover.from_node)  # fmt: skip
            self.jobs.publish("change", "job", job=record.name, role="source",
                              source_node=self.node, cause="switchover")  # fmt: skip

        def start() -> None:
            current = self.jobs.records.get(record.name)
            if current is None or current.epoch != record.epoch:
                return  # changed since (deleted, or handed on again)
            for mirror in record.mirrors:
                self.jobs.start_mirror(record, mirror, stores[mirror.target])
            self._unlock_when_connected(record)

        return start

    def _unlock_when_connected(self, record: JobRecord) -> None:
        """Take writes once every new mirror connected (so none of them is marked and
        resent), or after ``CONNECT_WAIT`` (a target is away: its writes are tracked)."""
        keys = {(record.name, m.target) for m in record.mirrors}
        volumes = steps.source_volumes(record)

        def pending() -> bool:
            mirrors = (self.jobs.mirrors.get(key) for key in keys)
            return any(m is not None and m.state is MirrorState.RESYNC_PENDING for m in mirrors)

        def unlock() -> None:
            if observe not in self.jobs.state_observers:
                return
            self.jobs.state_observers.remove(observe)
            timer.cancel()
            current = self.jobs.records.get(record.name)
            if current is not None and current.epoch == record.epoch:
                for volume in volumes:
                    self.jobs.services[volume].unlock()
                log.info("new source takes writes", job=record.name, waited_for_targets=pending())

        def observe(mirror: Mirror, was: MirrorState, cause: MirrorEvent) -> None:
            if (mirror.spec.job, mirror.spec.target) in keys and not pending():
                unlock()

        self.jobs.state_observers.append(observe)
        timer = asyncio.get_running_loop().call_later(CONNECT_WAIT, unlock)
        if not pending():
            unlock()

    def _check_adoptable(self, volume: str, handover: Handover) -> None:
        record, node = handover.job, self.node
        if record.source_node != node:
            raise Refusal("bad_request", f"the handover names {record.source_node}, not {node}")
        if record.name in self.jobs.records:
            raise Refusal("conflict", f"{node} is the source of a job {record.name!r} already")
        sources = steps.source_volumes(record)
        if volume not in sources:
            raise Refusal("bad_request", f"the handover does not make {volume} a source")
        for source_volume in sources:
            target = self.targets.records.get(source_volume)
            if target is None or target.job != record.name:
                raise Refusal(
                    "conflict", f"{node}:{source_volume} is no target of job {record.name!r}"
                )
            if target.data_state != pw.DataState.UP_TO_DATE.name:
                raise Refusal(
                    "conflict", f"{node}:{source_volume} is {target.data_state}, not UpToDate"
                )
        for mirror in record.mirrors:
            if mirror.target_node not in self.jobs.peers:
                raise Refusal(
                    "conflict", f"node {mirror.target_node!r} is not in {node}'s [peers]",
                    f"add it to {node}'s config and reload, then retry",
                )  # fmt: skip
