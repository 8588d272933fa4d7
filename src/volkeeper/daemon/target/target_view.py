"""A mirror as its target node sees it: what ``status`` shows of it on that node.

How this works: ``target_view`` builds the mirror view of a target volume from its record
(daemon/target/target_record.py), the job's record kept in it (mode, compression,
throttle), the state ``TargetVolumes`` reckons and the counters it keeps (``live``:
received bytes, the source's last connection, errors).  Byte counts only the source knows
are None: its intent log says what is out of sync.
"""

from __future__ import annotations

from typing import Any

from volkeeper.daemon.target.target_record import TargetRecord


def target_view(
    node: str, volume: str, record: TargetRecord, state: str, live: dict[str, Any]
) -> dict[str, Any]:
    job = record.job_record()
    target = f"{node}:{volume}"
    mirror = job.mirror(target) if job is not None else None
    settings = mirror.settings if mirror is not None else None
    may_lack = settings.queue_limit if settings and settings.mode == "async" else None
    return {
        "job": record.job,
        "source": f"{record.source_node}:{record.source_volume}",
        "target": target,
        "role": "target",
        "mode": settings.mode if settings is not None else None,
        "state": state,
        "data_state": record.shown_data_state(target),
        "out_of_sync_bytes": None,  # the source's intent log knows; ask it
        "sent_bytes": None,
        "resync_sent_bytes": None,
        "wire_bytes": None,
        "compression_ratio": None,
        "received_bytes": live["received_bytes"],
        "queue_bytes": None,
        "queue_limit_bytes": None,
        "lag_s": None,
        # an async copy may lack up to the queue's worth of acknowledged writes, made
        # before its source was last heard of (a failover's answer says the same)
        "may_lack_bytes": may_lack,
        "source_lost_at": live["source_lost_at"],
        "throughput_bytes_per_s": None,
        "compression": settings.compression if settings is not None else None,
        "throttle": settings.throttle if settings is not None else None,
        "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
        "unlocked": record.unlocked,
        "last_error": live["last_error"],
        "target_errors": live["target_errors"],
    }
