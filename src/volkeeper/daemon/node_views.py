"""What the node's control API shows of its volumes and jobs, as plain dictionaries.

How this works: ``volume_view`` is a volume as ``/volumes`` and ``status`` show it (its role
and lock; daemon/node.py adds its data state and generation), ``target_job_view`` a job
this node serves as a target, and ``brief_volume`` / ``brief_mirror`` the short forms of the
event stream's ``exists`` events.  The answer types are in daemon/api/api_models.py.
"""

from __future__ import annotations

from typing import Any

from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.io.volume_service import VolumeService


def target_job_view(job: JobRecord, mirrors: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": job.name,
        "description": job.description,
        "source_node": job.source_node,
        "role": "target",
        "declared": job.declared,
        "mirrors": mirrors,
    }


def brief_volume(view: dict[str, Any]) -> dict[str, Any]:
    return {"volume": view["name"], "role": view["role"], "locked": bool(view["locked"])}


def brief_mirror(view: dict[str, Any]) -> dict[str, Any]:
    keys = ("job", "source", "target", "role", "mode", "state")
    return {key: view[key] for key in keys}


def volume_view(service: VolumeService, target: bool, last_error: str | None) -> dict[str, Any]:
    volume, ops = service.volume, service.stats.ops
    role = "source" if service.replication is not None else "target" if target else "standalone"
    return {
        "name": volume.name,
        "path": volume.path,
        "kind": volume.kind,
        "size": volume.size,
        "sector_size": volume.sector_size,
        "role": role,
        "locked": service.lock_reason,
        "read_bytes": ops["read"].bytes,
        "written_bytes": ops["write"].bytes,
        "requests": {op: stats.requests for op, stats in ops.items()},
        "last_error": last_error,  # a target's: the last mirror frame it could not apply
    }
