"""Failover: a target promoted because its source is gone; the old source's return; split brain.

How this works:

``promote`` (on a target node, ``volkeeper volume promote VOL``) makes this node the source
of the volume's job.  Refused, with the reason, while the source is connected (a switchover
is the way then), and -- unless forced -- when the copy is Inconsistent, Outdated or Paused.
An async mirror's copy is Consistent (write order kept, recent writes possibly missing): the
answer says how much it may lack.  The job's record turns round (daemon/roles/handover.py);
each new mirror's intent log starts a new generation that grew from the one this copy held
(core/lineage.py), nothing marked -- the old source is behind by exactly what it marked and
what is written here from now on.  Another target's copy may differ from this one by writes
in flight when the source went: its mirror compares every region and sends those that
differ (a checksum resync).  The volume then takes writes at once.

When two copies of a job's source meet -- the HELLO of one reaches a volume the other is the
source of -- ``judge`` (asked by daemon/target/targets.py) decides, from their generations,
then the job's epochs, who stays the source:

    the HELLO's copy is behind, or the same line of an earlier epoch   REFUSE(SOURCE_MOVED):
                                                                        it becomes our target
    ours is behind, or the same line of a later epoch                  we become its target
                                                                        (REFUSE(BUSY): retry)
    both wrote since they parted (split brain), one of them nothing    that one yields
    both wrote, and the HELLO says the administrator kept its side     we yield
    both wrote                                                          REFUSE(SPLIT_BRAIN)
    unrelated, or another job                                           REFUSE(IS_SOURCE)

A copy that yields (``demote``) is fenced, stops its mirrors and becomes a target of the
other: UpToDate when its log owes the other nothing, else Inconsistent with the regions it
owes kept in its target record -- they join the new source's resync, which overwrites them
(their byte ranges are logged and published).  ``resolve`` is the administrator's choice in
a split brain: keeping this side, its mirror connects saying so (HELLO flag KEEP) and the
other side yields; keeping the other side, this one yields at once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import structlog

from volkeeper.core.intent_log_format import Generations
from volkeeper.core.lineage import Relation, relation
from volkeeper.core.mirror_state import MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.daemon.roles import steps
from volkeeper.daemon.roles.handover import turned_round
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.target.target_record import TargetRecord
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.errors import Refusal
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.nbd_server import NbdServer

log = structlog.get_logger("volkeeper.roles")

RESOLVE_WAIT = 30.0  # resolve keeping this side: how long the other side has to yield
R = pw.RefuseReason
UP_TO_DATE = pw.DataState.UP_TO_DATE.name


class Failover:
    def __init__(self, node: str, jobs: Jobs, targets: TargetVolumes, nbd: NbdServer) -> None:
        self.node = node
        self.jobs = jobs
        self.targets = targets
        self.nbd = nbd
        self._tasks: set[asyncio.Task[Any]] = set()
        targets.judge = self.judge
        jobs.mirrors.on_deposed = self.deposed

    # -- promotion ------------------------------------------------------------------------

    async def promote(self, volume: str, force: bool) -> dict[str, Any]:
        started = time.monotonic()
        async with self.jobs.changing:
            record, job = self._promotable(volume, force)
            turned, _ = turned_round(job, self.node)
            generations = Generations(secrets.randbits(64) or 1, record.current_generation)
            stores: dict[str, IntentStore] = {}
            for mirror in turned.mirrors:
                size = self.jobs.services[mirror.source_volume].volume.size
                back = mirror.target_node == record.source_node
                marked = b"" if back else None  # another target: every region compared
                store, named = self.jobs.logs.create(
                    turned.name, mirror, size, generations, marked, replace_leftover=True
                )
                stores[mirror.target] = store
                turned = turned.with_mirror(named)
            self.jobs.store.save(turned)  # the commit point
            self.jobs.records[turned.name] = turned
            for source_volume in steps.source_volumes(turned):
                self.targets.promoted(source_volume)
            for mirror in turned.mirrors:
                self.jobs.start_mirror(turned, mirror, stores[mirror.target])
                running = self.jobs.mirrors.get((turned.name, mirror.target))
                if running is not None and mirror.target_node != record.source_node:
                    running.engine.checksum_next = True
        answer = self._promoted(volume, record, job, turned, generations, force)
        answer["seconds"] = time.monotonic() - started
        return answer

    def _promotable(self, volume: str, force: bool) -> tuple[TargetRecord, JobRecord]:
        where = f"{self.node}:{volume}"
        record = self.targets.records.get(volume)
        if record is None:
            raise Refusal("conflict", f"{where} is not a mirror target: nothing to promote")
        job = record.job_record()
        if job is None:
            raise Refusal("conflict", f"{where}: the record of job {record.job!r} never "
                          "reached this node, so its mirrors are not known here")  # fmt: skip
        if volume in self.targets.sessions:
            raise Refusal(
                "conflict", f"cannot promote {where}: its source {record.source_node} is "
                "connected and serving", f"switch over instead, on {record.source_node}: "
                f"volkeeper job switchover {record.job} --to {self.node}",
            )  # fmt: skip
        state = record.shown_data_state(f"{self.node}:{volume}")
        refused = None
        if record.paused:
            refused = f"its mirror from {record.source_node} is Paused"
        elif state not in ("UpToDate", "Consistent"):
            refused = f"its data is {state}"
        if refused is not None and not force:
            raise Refusal(
                "conflict", f"cannot promote {where}: {refused}",
                "its data may lack writes the source acknowledged; --force promotes it "
                "anyway (recorded: the old source's return is then a split brain)",
            )  # fmt: skip
        return record, job

    def _promoted(
        self,
        volume: str,
        record: TargetRecord,
        job: JobRecord,
        turned: JobRecord,
        generations: Generations,
        force: bool,
    ) -> dict[str, Any]:
        state = record.shown_data_state(f"{self.node}:{volume}")
        lost_at = self.targets.lost_at.get(volume)
        mirror = job.mirror(f"{self.node}:{volume}")
        may_lack = None
        if state == "Consistent" and mirror is not None:
            may_lack = {
                "bytes": mirror.settings.queue_limit,
                "seconds_before": lost_at,  # writes acknowledged before then may be missing
            }
        log.warning("volume promoted: this node is the job's source", job=job.name,
                    volume=volume, was=record.source_node, data_state=state, forced=force,
                    generation=f"{generations.current:016x}")  # fmt: skip
        self.jobs.publish("change", "job", job=job.name, role="source", source_node=self.node,
                          cause="forced promotion" if force else "promotion")  # fmt: skip
        return {"volume": volume, "job": job.name, "old_source": record.source_node,
                "data_state": state, "forced": force, "generation": f"{generations.current:016x}",
                "may_lack": may_lack, "mirrors": [m.target for m in turned.mirrors]}  # fmt: skip

    # -- two sources meet -----------------------------------------------------------------

    def judge(self, hello: pw.Hello) -> pw.Refuse | None:
        """None unless ``hello``'s volume is a job's source here (the table above)."""
        record = next(
            (r for r in self.jobs.records.values()
             if hello.volume in steps.source_volumes(r)), None,
        )  # fmt: skip
        if record is None:
            return None
        where = f"{self.node}:{hello.volume}"
        other = f"{hello.node}:{hello.source_volume}"
        mirror = record.mirror(other) if record.name == hello.job else None
        running = self.jobs.mirrors.get((record.name, other)) if mirror else None
        if running is None:
            return pw.Refuse(R.IS_SOURCE, f"{where} is the source of a mirror here (job "
                             f"{record.name!r}): it cannot be a target too")  # fmt: skip
        ours = running.store.generations
        found = relation(ours, Generations(hello.current_generation, hello.previous_generation))
        if found is Relation.SAME and hello.epoch != record.epoch:
            found = Relation.BEHIND if hello.epoch < record.epoch else Relation.AHEAD
        if found is Relation.SPLIT_BRAIN:
            found = self._split(running, hello)
        if found is Relation.BEHIND:
            return pw.Refuse(R.SOURCE_MOVED, f"{where} is the source of job {record.name!r} "
                             f"now; {hello.node} is behind it and becomes its target")  # fmt: skip
        if found is Relation.AHEAD:
            self._spawn(self.demote(record.name, hello.node, f"{other} is ahead of this copy"))
            return pw.Refuse(R.BUSY, f"{where} gives way to {other}: retry")
        if found is Relation.SPLIT_BRAIN:
            return pw.Refuse(R.SPLIT_BRAIN, self._split_message(running, hello))
        return pw.Refuse(R.IS_SOURCE, f"{where} and {other} are both sources of job "
                         f"{record.name!r}, with unrelated generations")  # fmt: skip

    def _split(self, running: Mirror, hello: pw.Hello) -> Relation:
        """Both copies wrote since they parted: who yields without losing anything."""
        ours = running.store.bitmap.marked_bytes
        if hello.keep:
            return Relation.AHEAD
        if hello.marked_bytes == 0 and ours > 0:
            return Relation.BEHIND
        if ours == 0:
            return Relation.AHEAD
        return Relation.SPLIT_BRAIN

    def _split_message(self, running: Mirror, hello: pw.Hello) -> str:
        job = running.spec.job
        return (
            f"split brain in job {job!r}: {self.node} changed "
            f"{running.store.bitmap.marked_bytes} bytes and {hello.node} changed "
            f"{hello.marked_bytes} bytes since the copies parted; keep one with "
            f"volkeeper mirror resolve {job} --keep NODE"
        )

    # -- yielding -------------------------------------------------------------------------

    def deposed(self, mirror: Mirror, message: str) -> None:
        """Our mirror was refused with SOURCE_MOVED: its target is the source now."""
        self._spawn(self.demote(mirror.spec.job, mirror.spec.target_node, message))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def demote(self, name: str, source: str, why: str) -> list[tuple[int, int]]:
        """Become a target of ``source`` in job ``name``; returns the byte ranges of our
        changes that its resync will overwrite."""
        async with self.jobs.changing:
            record = self.jobs.records.get(name)
            if record is None or record.source_node != self.node:
                return []
            log.warning("another node is this job's source now: becoming its target",
                        job=name, source=source, why=why)  # fmt: skip
            await steps.fence(self.jobs, self.nbd, record, f"{source} is the source of job "
                              f"{name!r} now")  # fmt: skip
            stores = await steps.stop_mirrors(self.jobs, record)
            discarded: list[tuple[int, int]] = []
            for mirror in record.mirrors:
                store = stores.get(mirror.target)
                if mirror.target_node != source or store is None:
                    continue
                owed, region_size = steps.owed(store.bitmap)
                discarded += steps.byte_runs(store.bitmap)
                # Our copy is the generation the other side knows -- the one ours grew from,
                # if we started one it never held -- plus what we owe it.
                generations = store.generations
                known = generations.previous or generations.current
                state = UP_TO_DATE if not owed else pw.DataState.INCONSISTENT.name
                self.targets.become_target(
                    mirror.source_volume,
                    TargetRecord(
                        name, source, mirror.target_volume, state, known, 0, record.to_json(),
                        owed=owed, owed_region_size=region_size,
                    ),
                )  # fmt: skip
            self.jobs.forget(name)
        if discarded:
            log.error("changes here will be overwritten by the new source's resync", job=name,
                      source=source, ranges=discarded[:64],
                      discarded_bytes=sum(n for _, n in discarded))  # fmt: skip
        self.jobs.publish("change", "job", job=name, role="target", source_node=source,
                          cause=why, discarded=discarded[:64])  # fmt: skip
        return discarded

    # -- split brain ----------------------------------------------------------------------

    async def resolve(self, name: str, keep: str) -> dict[str, Any]:
        record = self.jobs.records.get(name)
        if record is None:
            raise Refusal("not_found", f"this node is not a source of job {name!r}")
        split = [
            m for m in record.mirrors
            if (running := self.jobs.mirrors.get((name, m.target))) is not None
            and running.state is MirrorState.SPLIT_BRAIN
        ]  # fmt: skip
        if not split:
            raise Refusal("conflict", f"job {name!r} is in no split brain on {self.node}")
        others = {m.target_node for m in split}
        if keep == self.node:
            return await self._keep_ours(name, split)
        if keep not in others:
            raise Refusal("bad_request", f"keep {self.node} or {', '.join(sorted(others))}")
        discarded = await self.demote(name, keep, f"split brain resolved: {keep} kept")
        return _resolved(name, keep, discarded)

    async def _keep_ours(self, name: str, split: list[Any]) -> dict[str, Any]:
        mirrors = [self.jobs.mirrors.get((name, m.target)) for m in split]
        for mirror in mirrors:
            assert mirror is not None
            mirror.keep = True
            mirror.resume_split()
        deadline = time.monotonic() + RESOLVE_WAIT
        discarded: list[tuple[int, int]] = []
        for mirror in mirrors:
            assert mirror is not None
            while mirror.state is MirrorState.RESYNC_PENDING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            mirror.keep = False
            discarded += mirror.owed_runs
        return _resolved(name, self.node, discarded)


def _resolved(job: str, kept: str, discarded: list[tuple[int, int]]) -> dict[str, Any]:
    """The answer to ``resolve``."""
    return {"job": job, "kept": kept, "discarded": discarded,
            "discarded_bytes": sum(length for _, length in discarded)}  # fmt: skip
