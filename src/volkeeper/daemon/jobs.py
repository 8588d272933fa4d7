"""Jobs on a source node: durable records, the mirrors they run, the administrator's commands.

How this works: a job names one source volume of this node and its target (``NODE:VOLUME``,
the node being one of the config's ``[peers]``).  ``Jobs.create`` checks the request, writes
the mirror's intent log with every region marked (mirror creation is a full resync, which
overwrites the target: the caller must confirm it), then the job record, and starts the
mirror; ``Jobs.load`` restarts every recorded job when the node starts (opening an intent log
that was not closed cleanly is crash recovery).  Records are JSON files in
``state_dir/jobs``, written atomically; a record also keeps whether the administrator paused
or broke the mirror, so a restart does not undo it.  Errors are ``JobError`` with a stable
code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from volkeeper.core import peer_wire as pw
from volkeeper.core.addresses import TcpAddress
from volkeeper.core.bitmap import MIN_REGION_SIZE, image_size
from volkeeper.core.mirror_state import IllegalTransition, MirrorState
from volkeeper.daemon.mirror import DEFAULT_QUEUE_LIMIT, MODES, Mirror, MirrorSpec
from volkeeper.daemon.replication import Replication
from volkeeper.errors import VolkeeperError
from volkeeper.io.intent_store import Generations, Geometry, IntentStore
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.jobs")

STOP_SYNC_TIMEOUT = 10.0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class JobError(VolkeeperError):
    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.hint = code, hint


@dataclass(frozen=True)
class JobRecord:
    name: str
    source_volume: str
    target_node: str
    target_volume: str
    mode: str = "sync"
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # async mode: bytes sent and not yet ACKed
    admin: str = "active"  # or "paused" / "broken": the administrator's last word


@dataclass(frozen=True)
class JobRequest:
    """What an administrator asks for when creating a job (API body, CLI options)."""

    name: str
    source: str  # NODE:VOLUME on this node
    target: str  # NODE:VOLUME on a peer
    mode: str = "sync"
    confirm: bool = False  # the full resync overwrites the target
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    region_size: int = MIN_REGION_SIZE


_ADMIN_STATES = {"paused": MirrorState.PAUSED, "broken": MirrorState.BROKEN}


@dataclass
class RunningJob:
    record: JobRecord
    mirror: Mirror
    replication: Replication
    task: asyncio.Task[None]


class Jobs:
    def __init__(
        self,
        node: str,
        state_dir: Path,
        bitmap_dir: Path,
        peers: dict[str, TcpAddress],
        services: dict[str, VolumeService],
        readers: IoWorkers,
        is_target: Any,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls  # client side of the peer link's TLS, or None for plain TCP
        self.node = node
        self.directory = state_dir / "jobs"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bitmap_dir = bitmap_dir
        self.bitmap_dir.mkdir(parents=True, exist_ok=True)
        self.peers = peers
        self.services = services
        self.readers = readers
        self.is_target = is_target
        self.running: dict[str, RunningJob] = {}

    def load(self) -> None:
        for path in sorted(self.directory.glob("*.json")):
            record = JobRecord(**json.loads(path.read_text()))
            store = IntentStore.open(self._log_path(record.name))
            if store.recovered_bytes:
                log.warning(
                    "intent log recovered after an unclean shutdown: hot regions marked",
                    job=record.name,
                    recovered_bytes=store.recovered_bytes,
                )
            self._start(record, store)

    def create(self, request: JobRequest) -> JobRecord:
        record = self._check(request)
        name, target, region_size = request.name, request.target, request.region_size
        try:
            image_size(MIN_REGION_SIZE, region_size)  # the bitmap's own check of the size
        except ValueError as exc:
            raise JobError("bad_request", f"region_size: {exc}") from None
        if not request.confirm:
            raise JobError(
                "confirmation_required",
                f"creating job {name!r} starts a full resync that overwrites {target}",
                "resend with confirm=true (CLI: --yes)",
            )
        service = self.services[record.source_volume]
        geometry = Geometry(volume_size=service.volume.size, region_size=region_size)
        generations = Generations(secrets.randbits(64) or 1)
        store = IntentStore.create(self._log_path(name), geometry, generations, all_dirty=True)
        self._save(record)
        self._start(record, store)
        return record

    def _check(self, request: JobRequest) -> JobRecord:
        name, mode, queue_limit = request.name, request.mode, request.queue_limit
        source, target = request.source, request.target
        if not NAME.fullmatch(name):
            raise JobError("bad_request", f"job name {name!r} must match {NAME.pattern}")
        if name in self.running:
            raise JobError("conflict", f"job {name!r} exists already")
        source_node, source_volume = _split(source, "source")
        target_node, target_volume = _split(target, "target")
        if source_node != self.node:
            raise JobError(
                "bad_request", f"source {source} is not on this node ({self.node})",
                "send the request to the source node",
            )  # fmt: skip
        if source_volume not in self.services:
            raise JobError("not_found", f"node {self.node} has no volume {source_volume!r}")
        if self.is_target(source_volume):
            raise JobError("conflict", f"{source} is a mirror target; it cannot be a source too")
        for job in self.running.values():
            if job.record.source_volume == source_volume:
                raise JobError(
                    "conflict", f"{source} is already the source of job {job.record.name!r}"
                )
        if target_node not in self.peers:
            known = ", ".join(self.peers) or "none"
            raise JobError("not_found", f"node {target_node!r} is not in [peers] (known: {known})")
        if mode not in MODES:
            raise JobError("bad_request", f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if queue_limit < 1024 * 1024:
            raise JobError("bad_request", f"queue limit must be at least 1 MiB, got {queue_limit}")
        return JobRecord(name, source_volume, target_node, target_volume, mode, queue_limit)

    def _start(self, record: JobRecord, store: IntentStore) -> None:
        service = self.services[record.source_volume]
        spec = MirrorSpec(
            record.name, record.source_volume, record.target_node,
            self.peers[record.target_node], record.target_volume, record.mode,
            record.queue_limit,
        )  # fmt: skip
        state = _ADMIN_STATES.get(record.admin, MirrorState.RESYNC_PENDING)
        mirror = Mirror(spec, self.node, service, store, self.readers, self.tls, state)
        replication = Replication(service, [mirror])
        service.replication = replication
        replication.start()
        task = asyncio.create_task(mirror.run())
        job = self.running[record.name] = RunningJob(record, mirror, replication, task)
        mirror.on_state = lambda changed: self._remember(job)

    async def delete(self, name: str) -> None:
        job = self._job(name)
        await self._halt(job, pw.GoodbyeReason.DELETED)
        (self.directory / f"{name}.json").unlink(missing_ok=True)  # first: never reloaded
        self._log_path(name).unlink(missing_ok=True)
        del self.running[name]

    # -- the administrator's commands on a job's mirror ---------------------------------------

    async def command(
        self, name: str, action: str, target: str | None, full: bool
    ) -> dict[str, Any]:
        """pause | continue | break | resync [full] | delete the mirror of job ``name``."""
        job = self._job(name)
        mirror = job.mirror
        if target is not None and target != mirror.spec.target:
            raise JobError(
                "not_found", f"job {name!r} has no mirror to {target}",
                f"its mirror goes to {mirror.spec.target}",
            )  # fmt: skip
        if action == "delete":
            view = mirror.view()
            await self.delete(name)
            return view
        if full and action != "resync":
            raise JobError("bad_request", "full applies to resync only")
        try:  # a state change is recorded by _remember
            if action == "pause":
                mirror.pause()
            elif action == "continue":
                mirror.resume()
            elif action == "break":
                mirror.break_()
            elif action == "resync" and full:
                await mirror.full_resync()
            elif action == "resync":
                mirror.resume()
            else:
                raise JobError("bad_request", f"unknown mirror command {action!r}")
        except IllegalTransition as exc:
            what = "resync (without --full)" if action == "resync" else action
            hint = "only `mirror resync --full` repairs a Broken mirror"
            raise JobError(
                "conflict", f"cannot {what} job {name!r}: its mirror is {exc.state.value}", hint
            ) from None
        return mirror.view()

    def _remember(self, job: RunningJob) -> None:
        """On every state change: record a pause or break (or its end), so that a restart
        keeps it."""
        state = job.mirror.state
        admin = next((a for a, s in _ADMIN_STATES.items() if s is state), "active")
        if admin != job.record.admin:
            job.record = dataclasses.replace(job.record, admin=admin)
            self._save(job.record)

    def _job(self, name: str) -> RunningJob:
        job = self.running.get(name)
        if job is None:
            raise JobError("not_found", f"no job named {name!r}")
        return job

    async def stop_all(self) -> None:
        for job in list(self.running.values()):
            await self._halt(job, None)
        self.running.clear()

    async def _halt(self, job: RunningJob, goodbye: pw.GoodbyeReason | None) -> None:
        with contextlib.suppress(TimeoutError):  # a last sync, so a restart resends nothing
            await asyncio.wait_for(job.replication.sync(), STOP_SYNC_TIMEOUT)
        await job.mirror.stop(goodbye)
        job.task.cancel()
        await asyncio.gather(job.task, return_exceptions=True)
        await job.replication.stop()
        while job.replication.in_flight:
            await asyncio.sleep(0.01)
        job.replication.service.replication = None
        job.mirror.close()

    def _save(self, record: JobRecord) -> None:
        path = self.directory / f"{record.name}.json"
        temporary = path.with_suffix(".tmp")
        with temporary.open("w") as handle:
            json.dump(asdict(record), handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:  # the rename itself must survive a power loss too
            os.fsync(directory)
        finally:
            os.close(directory)

    def _log_path(self, name: str) -> Path:
        return self.bitmap_dir / f"{name}.vkil"

    def views(self) -> list[dict[str, Any]]:
        return [job.mirror.view() for job in self.running.values()]


def _split(text: str, what: str) -> tuple[str, str]:
    node, _, volume = text.partition(":")
    if not node or not volume:
        raise JobError("bad_request", f"{what} must be NODE:VOLUME, got {text!r}")
    return node, volume
