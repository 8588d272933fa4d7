"""What the control API shows of a source node's jobs and their mirrors.

How this works: a running mirror describes itself (``Mirror.view``).  A recorded mirror that
is not running -- its target node left ``[peers]``, its volume is gone, no intent log could
be made for it -- is shown as ``Unknown`` with the reason as its last error: the node cannot
tell its state, and never shows a guess.  The answers' types are in daemon/api/api_models.py.
"""

from __future__ import annotations

from typing import Any

from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord
from volkeeper.daemon.source.mirror_view import mirror_view
from volkeeper.daemon.source.mirrors import Mirrors


def job_view(record: JobRecord, mirrors: Mirrors, node: str) -> dict[str, Any]:
    return {
        "name": record.name,
        "description": record.description,
        "source_node": record.source_node,
        "role": "source",
        "demoted": record.demoted,
        "epoch": record.epoch,
        "declared": record.declared,
        "mirrors": mirror_views(record, mirrors, node),
    }


def mirror_views(record: JobRecord, mirrors: Mirrors, node: str) -> list[dict[str, Any]]:
    views = []
    for mirror in record.mirrors:
        key = (record.name, mirror.target)
        running = mirrors.get(key)
        if running is not None:
            views.append(mirror_view(running))
        else:
            views.append(_unknown_view(record, mirror, node, mirrors.problems.get(key)))
    return views


def _unknown_view(
    record: JobRecord, mirror: MirrorRecord, node: str, problem: str | None
) -> dict[str, Any]:
    settings = mirror.settings
    return {
        "job": record.name, "source": f"{node}:{mirror.source_volume}", "target": mirror.target,
        "role": "source", "mode": settings.mode, "state": "Unknown", "out_of_sync_bytes": None,
        "sent_bytes": 0, "resync_sent_bytes": 0, "wire_bytes": 0, "compression_ratio": None,
        "queue_bytes": 0, "queue_limit_bytes": None, "lag_s": 0.0, "throughput_bytes_per_s": 0,
        "compression": settings.compression, "throttle": settings.throttle,
        "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
        "intent_log": None, "last_error": problem,
    }  # fmt: skip
