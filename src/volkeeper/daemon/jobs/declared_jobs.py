"""Jobs declared in the node's config file, applied at start and on every reload.

How this works: ``apply`` compares the config's ``[[job]]`` tables whose source is this node
with the jobs it runs.  A declared job that is missing is created (declaring it is the
confirmation; its targets are claimed by the mirrors' first connections, since at start
they may not be up yet); one that differs is brought in line mirror by mirror -- a removed
target is deleted, a new one added, changed settings applied live -- and one no longer
declared is deleted.  Mirrors that did not change are not touched: their links and resyncs
go on.  Jobs created through the API are never changed by the config.  The answer says
what was created, changed, deleted or left alone, and what could not be done.
"""

from __future__ import annotations

import structlog

from volkeeper.daemon.config.jobs import JobConfig, MirrorConfig
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.jobs.job_rules import JobRequest, MirrorRequest
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.errors import Refusal

log = structlog.get_logger("volkeeper.jobs")


async def apply(jobs: Jobs, declared: list[JobConfig]) -> dict[str, list[str]]:
    mine = {job.name: job for job in declared if job.source_node == jobs.node}
    summary: dict[str, list[str]] = {
        "created": [], "changed": [], "deleted": [], "unchanged": [], "errors": [],
    }  # fmt: skip
    for name, record in list(jobs.records.items()):
        if record.declared and name not in mine:
            summary["errors"] += await jobs.delete(name)
            summary["deleted"].append(name)
    for name, job in mine.items():
        existing = jobs.records.get(name)
        try:
            if existing is None:
                await jobs.create(JobRequest(name, _requests(job), job.description, declared=True))
                summary["created"].append(name)
            elif not existing.declared:
                raise Refusal("conflict", "it exists already, created through the API: left alone")
            elif await _reconcile(jobs, existing, job):
                summary["changed"].append(name)
            else:
                summary["unchanged"].append(name)
        except Refusal as exc:
            summary["errors"].append(f"job {name}: {exc}")
    for error in summary["errors"]:
        log.error("declared job not applied", problem=error)
    return summary


async def _reconcile(jobs: Jobs, record: JobRecord, job: JobConfig) -> bool:
    """Bring ``record`` in line with ``job``; True if anything changed."""
    wanted = {m.target: m for m in job.mirrors}
    changed = False
    for mirror in record.mirrors:
        declared = wanted.get(mirror.target)
        if declared is None or declared.source_volume != mirror.source_volume:
            await jobs.command(record.name, "delete", mirror.target, False)
            changed = True
    for target, declared in wanted.items():
        current = jobs.records[record.name].mirror(target) if record.name in jobs.records else None
        if current is None:
            await _add(jobs, job, declared)
            changed = True
            continue
        wanted_settings = declared.settings.live()
        if current.settings.live() != wanted_settings:
            await jobs.configure(record.name, target, wanted_settings)
            changed = True
    if record.name in jobs.records and jobs.records[record.name].description != job.description:
        jobs.describe(record.name, job.description)
        changed = True
    return changed


async def _add(jobs: Jobs, job: JobConfig, mirror: MirrorConfig) -> None:
    request = _request(mirror)
    if job.name in jobs.records:
        await jobs.add_target(job.name, request, confirm=True, claim_targets=False)
    else:  # its last mirror was replaced: the job went with it
        await jobs.create(JobRequest(job.name, (request,), job.description, declared=True))


def _request(mirror: MirrorConfig) -> MirrorRequest:
    return MirrorRequest(mirror.source, mirror.target, mirror.settings)


def _requests(job: JobConfig) -> tuple[MirrorRequest, ...]:
    return tuple(_request(mirror) for mirror in job.mirrors)
