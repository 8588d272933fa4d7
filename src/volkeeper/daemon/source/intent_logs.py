"""A source node's intent logs: where they live, how they are made, and what happens when one
cannot be trusted.

How this works: each mirror's log is ``bitmap_dir/JOB@NODE:VOLUME.vkil`` and its job record
keeps the log's id (``MirrorRecord.intent_log``, hex).  ``create`` makes a log with every
region marked (a new mirror's full resync) under a new id and returns the record that names
it.  ``open`` opens a recorded mirror's log with every check io/intent_store.py makes; the
record adopts the log's id and region size if it did not know them (records older than
either).  What
it finds is told, never hidden: damaged bitmap pages were marked (a partial resync of their
range), a crash marked the hot extents, a format-1 log was converted.  A log that cannot be
trusted at all (missing, damaged header, wrong length, another mirror's, another id, another
volume size) is set aside as ``NAME.vkil.untrusted`` for inspection and replaced by a new
one with every region marked: a full resync, with the reason as the mirror's notice, which
status shows as its last error until a resync completes.  Only when no new log can be made
either does ``open`` raise: the caller must then stop the volume from taking writes nobody
would track.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from volkeeper.core.intent_log_format import Generations, Geometry
from volkeeper.daemon.jobs.job_record import MirrorRecord
from volkeeper.errors import VolkeeperError, VolumeError
from volkeeper.io.intent_store import IntentStore, new_log_id, read_header

log = structlog.get_logger("volkeeper.intent")


@dataclass(frozen=True)
class Opened:
    store: IntentStore
    mirror: MirrorRecord  # names the log's id: differs from the record given if it changed
    notice: str | None  # what opening found, for the mirror's last error


class IntentLogs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, job: str, target: str) -> Path:
        return self.directory / f"{job}@{target}.vkil"

    def create(
        self,
        job: str,
        mirror: MirrorRecord,
        volume_size: int,
        generations: Generations | None = None,
        marked: bytes | None = None,
        replace_leftover: bool = False,
    ) -> tuple[IntentStore, MirrorRecord]:
        """A new log (regions of the mirror's region size), and ``mirror`` naming it, in
        ``generations`` (None: a new one) with the regions ``marked`` marks (a bitmap image;
        b"": none; None: every region).  ``replace_leftover``: a log a job that is not
        recorded here left behind (a takeover cut short by a crash) belongs to nothing and
        is replaced; otherwise an existing file is an error."""
        path = self.path(job, mirror.target)
        if replace_leftover and path.exists():
            log.warning("intent log of no recorded job replaced", log=str(path))
            path.unlink()
        log_id = new_log_id()
        geometry = Geometry(volume_size, mirror.settings.region_size)
        store = IntentStore.create(
            path, geometry, generations or Generations(secrets.randbits(64) or 1),
            mirror=_name(job, mirror), log_id=log_id, all_dirty=marked is None,
            marked=marked or b"",
        )  # fmt: skip
        return store, dataclasses.replace(mirror, intent_log=f"{log_id:016x}")

    def open(self, job: str, mirror: MirrorRecord, volume_size: int) -> Opened:
        """The mirror's log, checked; a new one (full resync) if it cannot be trusted.
        Raises VolkeeperError only if no new log can be made."""
        path = self.path(job, mirror.target)
        expected = int(mirror.intent_log, 16) if mirror.intent_log else None
        try:
            store = IntentStore.open(
                path, mirror=_name(job, mirror), log_id=expected, volume_size=volume_size
            )
        except VolkeeperError as exc:
            return self._replace(job, mirror, volume_size, str(exc))
        notice = store.damage_report()
        fields = {"job": job, "target": mirror.target, "log": str(path)}
        if notice is not None:
            log.error("intent log damaged: regions marked for resync", **fields,
                      pages=[d.page for d in store.damaged_pages],
                      marked_bytes=store.damage_marked_bytes)  # fmt: skip
        if store.recovered_bytes:
            log.warning("intent log recovered after an unclean shutdown: hot regions marked",
                        **fields, recovered_bytes=store.recovered_bytes)  # fmt: skip
        if store.converted_from is not None:
            log.info("intent log converted to the current format", **fields,
                     from_format=store.converted_from)  # fmt: skip
        settings = dataclasses.replace(mirror.settings, region_size=store.geometry.region_size)
        named = dataclasses.replace(mirror, settings=settings, intent_log=f"{store.log_id:016x}")
        return Opened(store, named, notice)

    def _replace(self, job: str, mirror: MirrorRecord, volume_size: int, why: str) -> Opened:
        path = self.path(job, mirror.target)
        aside = path.with_name(path.name + ".untrusted")
        try:
            if path.exists():
                os.replace(path, aside)
            store, named = self.create(job, mirror, volume_size)
        except (OSError, VolkeeperError) as exc:
            log.error("intent log untrusted and not replaceable", job=job,
                      target=mirror.target, why=why, error=str(exc))  # fmt: skip
            raise VolumeError(f"{why}; no new intent log could be made: {exc}") from None
        kept = f"; the old one is kept as {aside.name}" if aside.exists() else ""
        notice = f"{why}: a new intent log was made and a full resync started{kept}"
        log.error("intent log untrusted: full resync", job=job, target=mirror.target, why=why)
        return Opened(store, named, notice)

    def source_volumes(self, job: str) -> set[str]:
        """The source volumes ``job``'s logs say they track (for a job whose record is
        lost: its volumes must not take writes nobody tracks)."""
        volumes = set()
        for path in self.directory.glob(f"{glob.escape(job)}@*.vkil"):
            try:
                mirror = read_header(path).mirror
            except VolkeeperError as exc:
                log.error("intent log of a job without a record unreadable", log=str(path),
                          error=str(exc))  # fmt: skip
                continue
            named_job, _, rest = mirror.partition(": ")
            if named_job == job and " -> " in rest:
                volumes.add(rest.partition(" -> ")[0])
        return volumes

    def remove(self, job: str, target: str) -> None:
        self.path(job, target).unlink(missing_ok=True)


def _name(job: str, mirror: MirrorRecord) -> str:
    """The mirror a log belongs to, as its header names it."""
    return f"{job}: {mirror.source_volume} -> {mirror.target}"
