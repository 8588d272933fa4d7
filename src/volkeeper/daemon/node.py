"""The node daemon: owns the volumes, the NBD listener and the control API of one node.

How this works: ``Node.start()`` creates the state directory, opens every configured volume,
starts the NBD listener (the data path) and the control API (management).  The control API
runs as a separate task: if it fails, the node logs it and keeps serving NBD.  ``stop()`` is
the orderly shutdown SIGTERM/SIGINT trigger: stop accepting, let in-flight requests finish,
flush every volume, close.  ``run(config)`` is the ``volkeeper daemon`` entry point.

``reload()`` (SIGHUP, or POST /reload) re-reads the config file: jobs declared there are
applied (daemon/jobs/declared_jobs.py) and changed peer addresses reach the mirrors; a change to
``[node]``, ``[[volume]]`` or ``[tls]`` needs a restart, and the answer says so.  A config
that does not load changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from volkeeper import _compiled
from volkeeper.daemon import node_security, node_views, plan
from volkeeper.daemon.api.control_server import ControlServer
from volkeeper.daemon.api.events import EventBus
from volkeeper.daemon.api.metrics import (
    LimitCollector,
    MirrorCollector,
    NodeCollector,
    PeerCollector,
    RoleCollector,
)
from volkeeper.daemon.config.node import NodeConfig, load_config
from volkeeper.daemon.jobs import declared_jobs
from volkeeper.daemon.jobs.job_rules import JobRequest, MirrorRequest
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.daemon.roles.roles import Roles
from volkeeper.daemon.target.target_record import TargetRecord, TargetRecords
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.errors import ConfigError, Refusal, VolumeError
from volkeeper.io.control_tokens import TokenStore
from volkeeper.io.limits import Limits
from volkeeper.io.nbd_server import NbdServer
from volkeeper.io.peer_server import PeerServer
from volkeeper.io.uring import UringReads
from volkeeper.io.volume import open_volume
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

log = structlog.get_logger("volkeeper.node")

CERTIFICATE_CHECK = 2.0  # seconds between looks for pinned peers' missing certificates
IO_THREADS = 16  # enough for a QD32 cold-read load on two cores; threads mostly wait on disk


class Node:
    def __init__(self, config: NodeConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read by reload()
        self.name = config.node.name
        # First, so a bad certificate or key stops the daemon before anything is bound.
        self.trust = node_security.peer_trust(config)
        self._trust_wanted = asyncio.Event()  # look for peers' certificates now
        self._trust_task: asyncio.Task[None] | None = None
        self.services: list[VolumeService] = []
        self.readers = IoWorkers(IO_THREADS, "volkeeper-read")
        self.ring = UringReads.create() if config.node.io_uring else None
        access = node_security.nbd_access(config, self.trust.own)
        self.limits = Limits(**config.limits.model_dump())
        self.nbd = NbdServer(lambda: self.services, access, self.limits)
        self.targets: TargetVolumes | None = None
        self.peer_server: PeerServer | None = None
        self.jobs: Jobs | None = None
        self.roles: Roles | None = None
        self.events = EventBus()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            NodeCollector(lambda: self.services, lambda: self.nbd.connection_count)
        )
        self.registry.register(
            MirrorCollector(
                lambda: (
                    [run.mirror for run in self.jobs.mirrors.running.values()] if self.jobs else []
                ),
                lambda: self.targets.received() if self.targets else [],
            )
        )
        self.registry.register(RoleCollector(self.volume_list))
        self.registry.register(PeerCollector(self.peer_list))
        self.registry.register(LimitCollector(lambda: dict(self.limits.hits)))
        own = self.trust.own
        tokens = TokenStore(Path(config.node.state_dir))
        self.control = ControlServer(
            self, config.node.control, tokens, own.certificate, own.key,
            config.node.control_group, config.limits.max_connections,
        )  # fmt: skip
        self._control_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.config.node.state_dir, exist_ok=True)
        self.control.bind()  # first: a node that is already running is found before anything
        for volume_config in self.config.volumes:
            volume = open_volume(
                volume_config.name,
                str(volume_config.path),
                sector_size=volume_config.sector_size,
                size=volume_config.size,
                read_only=volume_config.read_only,
            )
            read_only = volume_config.read_only
            service = VolumeService(volume, self.readers, read_only=read_only, ring=self.ring)
            self.services.append(service)
            log.info("volume opened", volume=volume.name, path=volume.path, size=volume.size)
        reads = "io_uring" if self.ring else "worker threads"
        why = "" if self.ring or not self.config.node.io_uring else " (io_uring unavailable)"
        log.info(f"reads that miss the page cache: {reads}{why}")
        log.info(f"the core's data path: {_compiled.STATE}")
        by_name = {service.name: service for service in self.services}
        state_dir = Path(self.config.node.state_dir)
        peer_timeout = self.config.node.peer_timeout
        self.targets = TargetVolumes(
            self.name, by_name.get, TargetRecords(state_dir / "targets"), self.events.publish,
            peer_timeout,
        )  # fmt: skip
        self.targets.vouch = self.trust.check_source
        self.targets.limits = self.limits
        self.peer_server = PeerServer(
            self.targets.make_link, trust=self.trust, on_refused=self._trust_wanted.set,
            limits=self.limits,
        )  # fmt: skip
        await self.peer_server.listen(self.config.node.listen)
        node_security.log_peer_security(self.config, self.trust)
        self._trust_task = asyncio.create_task(self._keep_peer_certificates())
        self.jobs = Jobs(
            self.name, state_dir, Path(self.config.node.bitmap_dir), self.config.peer_addresses,
            by_name, self.readers, lambda volume: volume in self.target_records(),
            trust=self.trust, publish=self.events.publish, peer_timeout=peer_timeout,
        )  # fmt: skip
        self.roles = Roles(self.name, self.jobs, self.targets, self.nbd)
        self.roles.switchover.reconcile()
        self.jobs.load()
        self.roles.switchover.relock_demoted()
        await declared_jobs.apply(self.jobs, list(self.config.jobs))
        await self.nbd.listen(self.config.node.nbd)
        self._control_task = asyncio.create_task(self._serve_control())

    async def _keep_peer_certificates(self) -> None:
        """Fetch the certificates of pinned peers this node lacks (io/peer_trust.py): at
        start, when a handshake was refused, and every few seconds while any is missing."""
        while True:
            try:
                await self.trust.fetch_missing()
            except OSError as exc:  # the certificate cache cannot be written: say, retry
                log.error("peer certificates not kept", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trust_wanted.wait(), CERTIFICATE_CHECK)
            self._trust_wanted.clear()

    async def _serve_control(self) -> None:
        try:
            await self.control.serve()
        except (Exception, SystemExit) as exc:  # the data path outlives the management path
            log.error("control API failed; NBD keeps serving", error=repr(exc))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def reload(self) -> dict[str, Any]:
        if self.config_path is None:
            raise Refusal("bad_request", "this node was not started from a config file")
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            raise Refusal("bad_request", f"config not reloaded: {exc}") from None
        old = self.config
        restart = [
            section for section in ("node", "volumes", "tls", "limits")
            if getattr(config, section) != getattr(old, section)
        ]  # fmt: skip
        jobs = self._jobs()
        moved = [name for name, peer in config.peers.items() if old.peers.get(name) != peer]
        jobs.peers.clear()
        jobs.peers.update(config.peer_addresses)
        self.trust.peers = node_security.policies(config)
        self._trust_wanted.set()
        jobs.reconnect(moved)
        summary = await declared_jobs.apply(jobs, list(config.jobs))
        self.config = old.model_copy(update={"peers": config.peers, "jobs": config.jobs})
        if restart:
            log.warning("config reloaded; these sections need a restart", sections=restart)
        self.events.publish("change", "node", reloaded=True, **summary)
        return {**summary, "peers_changed": moved, "needs_restart": restart}

    async def reload_logged(self) -> None:
        """SIGHUP: reload, and log (nobody waits for an answer)."""
        try:
            summary = await self.reload()
        except Refusal as exc:
            log.error("reload failed", error=str(exc))
        else:
            log.info("config reloaded", **summary)

    def request_stop(self) -> None:
        log.info("stop requested")
        self._stopped.set()

    async def stop(self) -> None:
        self.events.close()  # ends the event streams, or uvicorn waits for them
        self.control.stop()
        await self.nbd.close()
        if self.jobs is not None:
            await self.jobs.stop_all()
        if self.targets is not None:
            await self.targets.shutdown()
        if self.peer_server is not None:
            await self.peer_server.close()
        if self._trust_task is not None:
            self._trust_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trust_task
        for service in self.services:  # nothing is in flight now: blocking here is fine
            try:
                service.close()
            except VolumeError as exc:
                log.error("flush at shutdown failed", volume=service.name, error=str(exc))
        if self._control_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._control_task, timeout=5)
        self.control.close()
        if self.ring is not None:
            self.ring.close()
        self.readers.shutdown()
        log.info("node stopped", node=self.name)

    # -- views for the control API --------------------------------------------------------

    def target_records(self) -> dict[str, TargetRecord]:
        return self.targets.records if self.targets is not None else {}

    def volume_list(self) -> list[dict[str, Any]]:
        targets = self.target_records()
        errors = self.targets.errors if self.targets is not None else {}
        return [
            node_views.volume_view(service, service.name in targets, errors.get(service.name))
            | self._lineage(service.name)
            for service in self.services
        ]

    def _lineage(self, volume: str) -> dict[str, Any]:
        """The copy's data state and generation (hex): a target's as its record says; a
        source's copy is the reference (UpToDate), in the generation of its mirrors' logs."""
        record = self.target_records().get(volume)
        if record is not None:
            return {"data_state": record.shown_data_state(f"{self.name}:{volume}"),
                    "generation": f"{record.current_generation:016x}"}  # fmt: skip
        running = self.jobs.mirrors.running if self.jobs is not None else {}
        logs = sorted((key[1], run.mirror.store) for key, run in running.items()
                      if run.mirror.spec.source_volume == volume)  # fmt: skip
        if not logs:
            return {"data_state": None, "generation": None}
        return {"data_state": "UpToDate", "generation": f"{logs[0][1].generations.current:016x}"}

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "identity": self.trust.fingerprint,
            "peers": self.peer_list(),
            "volumes": self.volume_list(),
            "mirrors": self._mirror_views(),
            "jobs": self.job_list(),
        }

    def peer_list(self) -> list[dict[str, Any]]:
        trust = self.trust
        return [
            {"name": name, "address": str(peer.address), "link": trust.security(name),
             "fingerprint": trust.pin(name)}
            for name, peer in self.config.peers.items()
        ]  # fmt: skip

    def _mirror_views(self) -> list[dict[str, Any]]:
        source = self.jobs.mirror_views() if self.jobs is not None else []
        return source + (self.targets.views() if self.targets is not None else [])

    def job_list(self) -> list[dict[str, Any]]:
        """Jobs this node is the source of, then those it serves as a target."""
        jobs = self.jobs.job_views() if self.jobs is not None else []
        if self.targets is not None:
            views = self.targets.views()
            for job in self.targets.jobs():
                mirrors = [view for view in views if view["job"] == job.name]
                jobs.append(node_views.target_job_view(job, mirrors))
        return jobs

    def event_snapshot(self) -> list[dict[str, Any]]:
        """Every object as it is now, for a new event stream's ``exists`` events."""
        volumes = [{"object": "volume", **node_views.brief_volume(v)} for v in self.volume_list()]
        jobs = [
            {"object": "job", "job": j["name"], "role": j["role"], "description": j["description"]}
            for j in self.job_list()
        ]
        mirrors = [{"object": "mirror", **node_views.brief_mirror(m)} for m in self._mirror_views()]
        return [{"object": "node", "node": self.name}, *volumes, *jobs, *mirrors]

    def _jobs(self) -> Jobs:
        assert self.jobs is not None, "the node has not started"
        return self.jobs

    async def create_job(self, request: JobRequest) -> dict[str, Any]:
        jobs = self._jobs()
        return jobs.job_view(await jobs.create(request))

    async def add_target(self, job: str, request: MirrorRequest, confirm: bool) -> dict[str, Any]:
        jobs = self._jobs()
        return jobs.job_view(await jobs.add_target(job, request, confirm))

    async def mirror_command(
        self, job: str, action: str, target: str | None, options: dict[str, bool]
    ) -> dict[str, Any]:
        jobs = self._jobs()
        return jobs.job_view(await jobs.command(job, action, target, **options))

    async def mirror_set(
        self, job: str, target: str | None, changes: dict[str, Any]
    ) -> dict[str, Any]:
        jobs = self._jobs()
        return jobs.job_view(await jobs.configure(job, target, changes))

    async def switchover(self, job: str, to: str) -> dict[str, Any]:
        assert self.roles is not None and self.targets is not None
        if job not in self._jobs().records and any(
            r.job == job for r in self.targets.records.values()
        ):  # a target: it asks the source
            return await self.roles.switchover.ask(job, to)
        return await self.roles.switchover.switchover(job, to)

    async def demote(self, job: str) -> dict[str, Any]:
        assert self.roles is not None
        return self._jobs().job_view(await self.roles.switchover.demote(job))

    async def activate(self, job: str) -> dict[str, Any]:
        assert self.roles is not None
        return self._jobs().job_view(await self.roles.switchover.activate(job))

    async def promote(self, volume: str, force: bool) -> dict[str, Any]:
        assert self.roles is not None
        return await self.roles.failover.promote(volume, force)

    async def resolve(self, job: str, keep: str) -> dict[str, Any]:
        assert self.roles is not None
        return await self.roles.failover.resolve(job, keep)

    async def delete_job(self, name: str) -> list[str]:
        return await self._jobs().delete(name)

    def lock_volume(self, volume: str, lock: bool) -> dict[str, Any]:
        assert self.targets is not None
        if lock:
            self.targets.lock(volume)
        else:
            self.targets.unlock(volume)
        self.events.publish("change", "volume", volume=volume, locked=lock)
        return self._volume(volume)

    def release_volume(self, volume: str) -> dict[str, Any]:
        """Forget the mirror a target volume serves (its source is gone for good)."""
        assert self.targets is not None
        self.targets.forget(volume)
        self.events.publish("destroy", "mirror", target=f"{self.name}:{volume}", role="target")
        return self._volume(volume)

    async def plan(self, volume: str, seconds: float) -> dict[str, Any]:
        service = next((s for s in self.services if s.name == volume), None)
        if service is None:
            raise Refusal("not_found", f"node {self.name} has no volume {volume!r}")
        if not 1 <= seconds <= plan.MAX_SECONDS:
            raise Refusal("bad_request", f"seconds must be 1 to {plan.MAX_SECONDS:.0f}")
        return await plan.plan(service, self.readers, seconds)

    def _volume(self, name: str) -> dict[str, Any]:
        return {v["name"]: v for v in self.volume_list()}[name]


async def serve(config: NodeConfig, config_path: Path | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down cleanly; SIGHUP reloads."""
    node = Node(config, config_path)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, node.request_stop)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = asyncio.create_task(node.reload_logged())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await node.start()
        # What was built to start (modules, the API's models, volumes, mirrors) lives as long
        # as the daemon: out of the collector's sight, a collection looks only at what the
        # data path allocates (3-5% of a mirrored write's CPU, measured; docs/performance.md).
        gc.freeze()
        log.info(
            "node ready", node=node.name, nbd=str(config.node.nbd), control=str(config.node.control)
        )
        await node.wait_stopped()
    finally:
        await node.stop()


def run(config: NodeConfig, config_path: Path | None = None) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config, config_path))
    else:
        uvloop.run(serve(config, config_path))
