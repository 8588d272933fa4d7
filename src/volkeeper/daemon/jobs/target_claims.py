"""Claiming a job's targets over the peer link, and releasing one, in the API's words.

How this works: creating a mirror *claims* its target (daemon/source/peer_session.py: the
target node checks its volume, locks it and records the job); ``claim_targets`` claims all of
a request's targets or none and turns a refusal or an unreachable node into the ``Refusal``
the control API answers with.  ``release_target`` tells a target that is not connected that
its mirror is gone (it unlocks the volume, data kept); one that cannot be told stays locked,
and the warning says how to release it by hand.
"""

from __future__ import annotations

import structlog

from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import MirrorRecord
from volkeeper.daemon.source.peer_session import (
    Refused,
    Target,
    Unreachable,
    claim_all,
    release_retrying,
)
from volkeeper.errors import Refusal
from volkeeper.io.peer_trust import PeerTrust

log = structlog.get_logger("volkeeper.jobs")

REFUSAL_CODES = {
    pw.RefuseReason.NO_SUCH_VOLUME: "not_found",
    pw.RefuseReason.SIZE: "bad_request",
    pw.RefuseReason.SECTOR_SIZE: "bad_request",
}


async def claim_targets(targets: list[Target], job: pw.Job, trust: PeerTrust | None) -> None:
    """Claim every target or none; a ``Refusal`` says why not."""
    try:
        await claim_all(targets, job, trust)
    except Refused as exc:
        raise Refusal(REFUSAL_CODES.get(exc.refusal.reason, "conflict"), str(exc)) from None
    except Unreachable as exc:
        hint = "the target node must be running and reachable to create a mirror"
        raise Refusal("unavailable", str(exc), hint) from None


async def release_target(
    target: Target | None, mirror: MirrorRecord, job: str, trust: PeerTrust | None
) -> list[str]:
    """Tell ``target`` (None: its node or source volume is no longer configured) to forget
    ``mirror``; returns a warning if it could not be told."""
    if target is None:
        problem: str | None = "its node or source volume is no longer configured"
    else:
        problem = await release_retrying(target, trust, f"job {job} deleted")
    if problem is None:
        return []
    warning = (
        f"{mirror.target} was not told the mirror is gone ({problem}); it stays locked: "
        f"on {mirror.target_node}, run `volkeeper volume release {mirror.target_volume}`"
    )
    log.warning("mirror target not released", job=job, warning=warning)
    return [warning]
