"""Jobs on a source node: their records, the mirrors they run, the administrator's commands.

How this works: a job (daemon/jobs/job_record.py) names mirrors from volumes of this node to
volumes of its peers.  ``create`` checks the request, writes each mirror's intent log with
every region marked (a new mirror is a full resync, which overwrites the target: the caller
must confirm it) and the job record, then *claims* every target over the peer link
(daemon/source/peer_session.py: the target checks its volume, locks it and records the job).  If any
claim fails, the claims that succeeded are released and the record and logs removed, so
nothing is left half-created; only then do the mirrors start.  ``add_target`` does the same
for one more mirror of a job.  ``load`` restarts every recorded job when the node starts.

The mirrors themselves run in ``Mirrors`` (daemon/source/mirrors.py).  Deleting a mirror stops it
there and tells the target (GOODBYE(DELETED): unlocked, data kept), over a short session of
its own if the mirror was not connected; a target that cannot be told stays locked and the
answer says so.  Commands that change jobs run one at a time (``changing``).  State changes
of mirrors, and every change of a job, are published as events; a pause or break is kept in
the record so a restart does not undo it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import (
    JobRecord,
    JobRecords,
    MirrorRecord,
    check_description,
    check_name,
)
from volkeeper.daemon.jobs.job_rules import JobRequest, MirrorRequest, NodeFacts, check_mirrors
from volkeeper.daemon.jobs.job_views import job_view, mirror_views
from volkeeper.daemon.jobs.mirror_commands import check_command, check_options, run_command
from volkeeper.daemon.jobs.target_claims import claim_targets, release_target
from volkeeper.daemon.source.intent_logs import IntentLogs
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.daemon.source.mirrors import ADMIN_STATES, Mirrors
from volkeeper.errors import Refusal, VolkeeperError
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.peer_trust import PeerTrust
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.jobs")

Publish = Callable[..., None]


class Jobs:
    def __init__(
        self,
        node: str,
        state_dir: Path,
        bitmap_dir: Path,
        peers: dict[str, TcpAddress],
        services: dict[str, VolumeService],
        readers: IoWorkers,
        is_target: Callable[[str], bool],
        trust: PeerTrust | None = None,
        publish: Publish | None = None,
        *,
        peer_timeout: float,
    ) -> None:
        self.node = node
        self.store = JobRecords(state_dir / "jobs")
        self.logs = IntentLogs(bitmap_dir)
        self.peers = peers
        self.services = services
        self.is_target = is_target
        self.trust = trust  # how to reach each peer safely (None: plain TCP, tests)
        self.publish: Publish = publish or _ignore
        self.records: dict[str, JobRecord] = {}
        self.mirrors = Mirrors(
            node, peers, services, readers, trust, self._state_changed, self._publish_error,
            peer_timeout,
        )  # fmt: skip
        self.state_observers: list[Callable[[Mirror, MirrorState, MirrorEvent], None]] = []
        self.changing = asyncio.Lock()

    # -- start and stop ---------------------------------------------------------------------

    def load(self) -> None:
        records, unreadable = self.store.load_all()
        for record in records:
            self.records[record.name] = record
            for mirror in record.mirrors:
                self.load_mirror(record.name, mirror)
        for job, why in unreadable.items():  # its volumes' writes would go untracked
            for volume in self.logs.source_volumes(job) & self.services.keys():
                self.services[volume].lock(f"{why}: fix or remove it, then restart the node")

    def load_mirror(self, job: str, mirror: MirrorRecord) -> None:
        problem = self.mirrors.problem(mirror)
        if problem is not None:  # the volume, if it is there, must not take untracked writes
            source = self.services.get(mirror.source_volume)
            self.mirrors.cannot_start(job, mirror, problem, lock=source)
            return
        service = self.services[mirror.source_volume]
        try:
            opened = self.logs.open(job, mirror, service.volume.size)
        except VolkeeperError as exc:  # nothing could track its writes: no writes
            self.mirrors.cannot_start(job, mirror, str(exc), lock=service)
            return
        if opened.mirror != mirror:  # a new log, or an old record adopting its log's id
            record = self.records[job].with_mirror(opened.mirror)
            try:
                self.store.save(record)
            except OSError as exc:  # the next start finds the ids differ: a full resync
                log.error("job record not saved", job=job, error=str(exc))
            self.records[job] = record
        self.start_mirror(self.records[job], opened.mirror, opened.store, opened.notice)
        running = self.mirrors.get((job, mirror.target))
        if opened.notice is not None and running is not None:
            self._publish_error(running, opened.notice)

    async def stop_all(self) -> None:
        await self.mirrors.stop_all()

    # -- creating ---------------------------------------------------------------------------

    async def create(self, request: JobRequest) -> JobRecord:
        async with self.changing:
            check_name(request.name, "job name")
            check_description(request.description)
            if request.name in self.records:
                raise Refusal("conflict", f"job {request.name!r} exists already")
            if not request.mirrors:
                raise Refusal("bad_request", f"job {request.name!r} needs at least one mirror")
            mirrors = check_mirrors(request.mirrors, self._facts(), self.records.values())
            if not (request.confirm or request.declared):
                targets = ", ".join(m.target for m in mirrors)
                raise Refusal(
                    "confirmation_required",
                    f"creating job {request.name!r} starts a full resync that overwrites {targets}",
                    "resend with confirm=true (CLI: --yes)",
                )
            record = JobRecord(
                request.name, self.node, tuple(mirrors), request.description, request.declared
            )
            record = await self._add(record, mirrors, claim_targets=not request.declared)
            self.publish("create", "job", job=record.name, description=record.description)
            return record

    async def add_target(
        self, job: str, request: MirrorRequest, confirm: bool, claim_targets: bool = True
    ) -> JobRecord:
        async with self.changing:
            record = self.record(job)
            if not request.source:
                sources = {m.source_volume for m in record.mirrors}
                if len(sources) != 1:
                    raise Refusal(
                        "bad_request", f"job {job!r} has several source volumes: name one"
                    )
                request = dataclasses.replace(request, source=f"{self.node}:{sources.pop()}")
            (mirror,) = check_mirrors((request,), self._facts(), self.records.values(), job)
            if not confirm:
                raise Refusal(
                    "confirmation_required",
                    f"adding {mirror.target} to job {job!r} starts a full resync, which "
                    "overwrites it",
                    "resend with confirm=true (CLI: --yes)",
                )
            record = dataclasses.replace(record, mirrors=(*record.mirrors, mirror))
            record = await self._add(record, [mirror], claim_targets)
            self._announce(record)
            return record

    async def _add(
        self,
        record: JobRecord,
        mirrors: list[MirrorRecord],
        claim_targets: bool,
    ) -> JobRecord:
        """Intent logs and record first (so a crash leaves a whole job), then the claims;
        undo all of it if any claim fails; then start the new mirrors.  Returns the record,
        which names the new logs."""
        stores = {}
        for mirror in mirrors:
            size = self.services[mirror.source_volume].volume.size
            store, named = self.logs.create(record.name, mirror, size)
            stores[mirror.target] = store
            record = record.with_mirror(named)
        mirrors = [named for named in record.mirrors if named.target in stores]
        previous = self.records.get(record.name)
        self.store.save(record)
        if claim_targets:
            try:
                await self._claim_all(record, mirrors, stores)
            except Refusal:
                for mirror in mirrors:
                    stores[mirror.target].close()
                    self.logs.remove(record.name, mirror.target)
                if previous is None:
                    self.store.remove(record.name)
                else:
                    self.store.save(previous)
                raise
        self.records[record.name] = record
        for mirror in mirrors:
            self.start_mirror(record, mirror, stores[mirror.target])
            self.publish(
                "create", "mirror", job=record.name, source=self._source(mirror),
                target=mirror.target, mode=mirror.settings.mode,
            )  # fmt: skip
        return record

    async def _claim_all(
        self, record: JobRecord, mirrors: list[MirrorRecord], stores: dict[str, IntentStore]
    ) -> None:
        targets = [
            self.mirrors.target(record.name, m, stores[m.target].generations, record.epoch)
            for m in mirrors
        ]
        await claim_targets(targets, pw.Job(record.to_json()), self.trust)

    def start_mirror(
        self, record: JobRecord, mirror: MirrorRecord, store: IntentStore, notice: str | None = None
    ) -> None:
        name = record.name

        def document() -> str:
            return self.records[name].to_json()

        self.mirrors.start(name, mirror, store, document, notice, epoch=record.epoch)

    # -- deleting ---------------------------------------------------------------------------

    async def delete(self, name: str) -> list[str]:
        """Delete a job and its mirrors; returns warnings (targets that could not be told)."""
        async with self.changing:
            record = self.record(name)
            self.store.remove(name)  # first: never reloaded, whatever happens next
            warnings = []
            for mirror in record.mirrors:
                warnings += await self._delete_mirror(record, mirror)
            del self.records[name]
            self.publish("destroy", "job", job=name)
            return warnings

    async def _delete_mirror(self, record: JobRecord, mirror: MirrorRecord) -> list[str]:
        told = await self.mirrors.stop((record.name, mirror.target), pw.GoodbyeReason.DELETED)
        warnings = [] if told else await self._release(record, mirror)
        self.logs.remove(record.name, mirror.target)
        self.publish("destroy", "mirror", job=record.name, target=mirror.target)
        return warnings

    async def _release(self, record: JobRecord, mirror: MirrorRecord) -> list[str]:
        """Tell a target that is not connected to forget the mirror."""
        target = None
        if mirror.target_node in self.peers and mirror.source_volume in self.services:
            target = self.mirrors.target(record.name, mirror, Generations(0), record.epoch)
        return await release_target(target, mirror, record.name, self.trust)

    def forget(self, name: str) -> None:
        """The job's source moved to another node (daemon/roles/switchover.py): its mirrors
        stopped already; its record and intent logs go, its targets are not told."""
        record = self.records.pop(name)
        self.store.remove(name)
        for mirror in record.mirrors:
            self.logs.remove(name, mirror.target)
            self.publish("destroy", "mirror", job=name, target=mirror.target)
        self.publish("destroy", "job", job=name)

    # -- the administrator's commands on mirrors --------------------------------------------

    async def command(
        self,
        name: str,
        action: str,
        target: str | None,
        full: bool = False,
        checksum: bool = False,
        mark: bool = False,
    ) -> JobRecord:
        """pause | continue | break | resync [full | checksum] | verify [mark] | delete, on
        one mirror of job ``name`` (``target``) or, except delete, on all of them."""
        async with self.changing:
            record = self.record(name)
            mirrors = record.selected(target)
            if action == "delete":
                return await self._delete_one(record, target)
            check_options(action, full, checksum, mark)
            running = [self._running(name, m.target) for m in mirrors]
            for mirror in running:  # all or nothing: check every mirror first
                check_command(name, mirror.spec.target, mirror.state, action, full or checksum)
            for mirror in running:  # a state change is recorded by _state_changed
                await run_command(mirror, action, full, checksum, mark)
            return self.records[name]

    async def _delete_one(self, record: JobRecord, target: str | None) -> JobRecord:
        if target is None and len(record.mirrors) > 1:
            targets = ", ".join(m.target for m in record.mirrors)
            raise Refusal(
                "bad_request", f"job {record.name!r} has {len(record.mirrors)} mirrors ({targets})",
                "say which with target (CLI: --target), or delete the job",
            )  # fmt: skip
        mirror = record.mirror(target) if target else record.mirrors[0]
        assert mirror is not None
        remaining = record.without_mirror(mirror.target)
        if remaining.mirrors:
            self.store.save(remaining)
            self.records[record.name] = remaining
        else:  # its last mirror: the job goes with it
            self.store.remove(record.name)
        warnings = await self._delete_mirror(record, mirror)
        if remaining.mirrors:
            self._announce(remaining)
        else:
            del self.records[record.name]
            self.publish("destroy", "job", job=record.name)
        for warning in warnings:
            log.warning("mirror deleted", warning=warning)
        return remaining

    async def configure(self, name: str, target: str | None, changes: dict[str, Any]) -> JobRecord:
        """``mirror set``: any of LIVE_SETTINGS on live mirrors (``changes`` parsed)."""
        async with self.changing:
            record = self.record(name)
            updated = record
            for mirror in record.selected(target):
                try:
                    settings = mirror.settings.changed(**changes)
                except ValueError as exc:
                    raise Refusal("bad_request", str(exc)) from None
                updated = updated.with_mirror(dataclasses.replace(mirror, settings=settings))
            self._apply_settings(record, updated)
            return updated

    def _apply_settings(self, record: JobRecord, updated: JobRecord) -> None:
        if updated == record:
            return  # idempotent: nothing written, nothing announced
        self.store.save(updated)
        self.records[record.name] = updated
        for before, after in zip(record.mirrors, updated.mirrors, strict=True):
            if before != after:
                self.mirrors.reconfigure(record.name, after)
                self.publish(
                    "change", "mirror", job=record.name, target=after.target,
                    **after.settings.live(),
                )  # fmt: skip
        self._announce(updated)

    def reconnect(self, nodes: list[str]) -> None:
        """The addresses of ``nodes`` changed: their mirrors reconnect to the new ones."""
        for record in self.records.values():
            for mirror in record.mirrors:
                if mirror.target_node in nodes:
                    self.mirrors.reconfigure(record.name, mirror, reconnect=True)

    def describe(self, name: str, description: str) -> JobRecord:
        check_description(description)
        record = dataclasses.replace(self.record(name), description=description)
        self.store.save(record)
        self.records[name] = record
        self._announce(record)
        self.publish("change", "job", job=name, description=description)
        return record

    def _announce(self, record: JobRecord) -> None:
        for mirror in record.mirrors:
            running = self.mirrors.get((record.name, mirror.target))
            if running is not None:
                running.announce()

    def _state_changed(self, mirror: Mirror, was: MirrorState, cause: MirrorEvent) -> None:
        """Publish the change; record a pause or break (or its end) for restarts."""
        spec = mirror.spec
        self.publish(
            "change", "mirror", job=spec.job, source=f"{self.node}:{spec.source_volume}",
            target=spec.target, state=mirror.state.value, was=was.value, cause=cause.value,
        )  # fmt: skip
        for observe in self.state_observers:
            observe(mirror, was, cause)
        record = self.records.get(spec.job)
        current = record.mirror(spec.target) if record is not None else None
        if record is None or current is None or (spec.job, spec.target) not in self.mirrors.running:
            return  # being deleted
        admin = next((a for a, s in ADMIN_STATES.items() if s is mirror.state), "active")
        if admin != current.admin:
            updated = record.with_mirror(dataclasses.replace(current, admin=admin))
            self.records[spec.job] = updated
            try:
                self.store.save(updated)
            except OSError as exc:  # a failing state disk must not stop the change itself
                log.error("job record not saved: a restart will not remember the state",
                          job=spec.job, target=spec.target, state=mirror.state.value,
                          error=str(exc))  # fmt: skip

    def _publish_error(self, mirror: Mirror, message: str) -> None:
        """Publish an error that stands until a resync completes."""
        spec = mirror.spec
        self.publish(
            "change", "mirror", job=spec.job, source=f"{self.node}:{spec.source_volume}",
            target=spec.target, state=mirror.state.value, error=message,
        )  # fmt: skip

    # -- lookups and views ------------------------------------------------------------------

    def record(self, name: str) -> JobRecord:
        record = self.records.get(name)
        if record is None:
            raise Refusal("not_found", f"no job named {name!r}")
        return record

    def _running(self, job: str, target: str) -> Mirror:
        running = self.mirrors.get((job, target))
        if running is None:
            problem = self.mirrors.problems.get((job, target), "not running")
            raise Refusal(
                "conflict", f"the mirror of job {job!r} to {target} is not running: {problem}"
            )
        return running

    def _facts(self) -> NodeFacts:
        return NodeFacts(self.node, self.services, self.peers, self.is_target)

    def _source(self, mirror: MirrorRecord) -> str:
        return f"{self.node}:{mirror.source_volume}"

    def mirror_views(self) -> list[dict[str, Any]]:
        return [v for r in self.records.values() for v in mirror_views(r, self.mirrors, self.node)]

    def job_view(self, record: JobRecord) -> dict[str, Any]:
        return job_view(record, self.mirrors, self.node)

    def job_views(self) -> list[dict[str, Any]]:
        return [self.job_view(record) for record in self.records.values()]


def _ignore(*args: object, **fields: object) -> None:
    return None
