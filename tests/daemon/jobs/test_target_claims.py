"""Releasing a target that cannot be told leaves a warning that says how to release it by hand
(claims and releases over a real link are tested in tests/integration/test_job_admin.py)."""

from __future__ import annotations

import asyncio

from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.daemon.jobs.job_record import MirrorRecord
from volkeeper.daemon.jobs.target_claims import release_target


def test_a_target_whose_node_is_gone_stays_locked_with_a_warning() -> None:
    mirror = MirrorRecord("data1", "beta", "data1", MirrorSettings())
    warnings = asyncio.run(release_target(None, mirror, "web", None))
    assert warnings == [
        "beta:data1 was not told the mirror is gone (its node or source volume is no longer "
        "configured); it stays locked: on beta, run `volkeeper volume release data1`"
    ]
