"""What ``status`` shows of a running mirror: its state, progress, queue, settings, intent log.

How this works: ``mirror_view`` reads a ``Mirror`` (daemon/source/mirror.py), its engine and
its running resync or verify, and returns the dictionary the control API answers with
(daemon/api/api_models.py's ``MirrorView`` is its schema).  A Broken mirror tracks nothing,
so all of its volume counts as out of sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from volkeeper.core.mirror_state import MirrorState

if TYPE_CHECKING:
    from volkeeper.daemon.source.mirror import Mirror


def mirror_view(mirror: Mirror) -> dict[str, Any]:
    """What ``status`` shows of a running mirror (the API's ``MirrorView``)."""
    walks, now, settings = mirror.walks, mirror.clock(), mirror.spec.settings
    resync = walks.resync
    verify = walks.verify.result if walks.verify is not None else walks.verified
    rate = resync.rate(now) if resync is not None else 0.0
    mirror.throughput.sample(now, mirror.sent_bytes)
    done = resync.done_bytes if resync is not None else 0
    remaining = resync.remaining_bytes if resync is not None else 0
    activity_log = mirror.store.activity_log
    out_of_sync = mirror.store.bitmap.marked_bytes
    if mirror.state is MirrorState.BROKEN:  # untracked: all of it needs resending
        out_of_sync = mirror.service.volume.size
    return {
        "job": mirror.spec.job,
        "source": f"{mirror.node}:{mirror.spec.source_volume}",
        "target": mirror.spec.target,
        "role": "source",
        "mode": mirror.spec.settings.mode,
        "state": mirror.state.value,
        "out_of_sync_bytes": out_of_sync,
        "sent_bytes": mirror.sent_bytes,
        "resync_sent_bytes": mirror.resync_sent_bytes,
        "wire_bytes": mirror.wire_bytes,
        "compression_ratio": _ratio(mirror.sent_bytes, mirror.wire_bytes),
        "queue_bytes": mirror.ledger.queued_bytes,
        "queue_limit_bytes": settings.queue_limit if settings.mode == "async" else None,
        "lag_s": round(_lag_seconds(mirror, now), 3),
        "throughput_bytes_per_s": round(mirror.throughput.rate(now, mirror.sent_bytes)),
        "compression": mirror.spec.settings.compression,
        "throttle": mirror.spec.settings.throttle,
        "resync_min": mirror.spec.settings.resync_min,
        "resync_max": mirror.spec.settings.resync_max,
        "resync": {
            "done_bytes": done,
            "total_bytes": done + remaining if resync is not None else 0,
            "rate_bytes_per_s": round(rate),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
        },
        "intent_log": {
            "region_bytes": mirror.store.bitmap.region_size,
            "hot_extents": len(activity_log.active_extents),
            "hot_extent_bytes": activity_log.extent_bytes,
            "crash_resync_bound_bytes": min(
                activity_log.resync_bound_bytes, mirror.service.volume.size
            ),
        },
        "verify": verify.view() if verify is not None else None,
        "checksum_resync": mirror.engine.checksum_next,
        "last_error": mirror.last_error or None,
        "target_errors": mirror.engine.target_errors,
    }


def _ratio(before: int, after: int) -> float | None:
    return round(before / after, 2) if after else None


def _lag_seconds(mirror: Mirror, now: float) -> float:
    """Age of the oldest write sent and not yet ACKed (async mode's lag)."""
    pending = mirror.ledger.pending
    if not pending:
        return 0.0
    oldest = next(iter(pending.values()))
    return max(0.0, now - oldest.sent_at)
