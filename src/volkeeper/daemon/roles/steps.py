"""Steps every role change shares: fencing a job's volumes, stopping its mirrors, and what a
copy that stops being the source owes the new one.

How this works: ``fence`` locks each volume (NBD writes refused, new connections read-only)
and detaches its clients once the requests they have in flight are answered.
``stop_mirrors`` stops every mirror of a job without a goodbye and returns their intent
logs, closed: their bitmaps and generations stay readable for what comes next.  ``owed``
packs the regions a log marks for a target as a deposed copy keeps them in its target
record (daemon/target/target_record.py), and ``byte_runs`` says which bytes those are, for
the administrator.
"""

from __future__ import annotations

import asyncio
import base64
import zlib

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.io.intent_store import IntentStore
from volkeeper.io.nbd_server import NbdServer


def source_volumes(record: JobRecord) -> list[str]:
    return sorted({m.source_volume for m in record.mirrors})


async def fence(jobs: Jobs, nbd: NbdServer, record: JobRecord, why: str) -> None:
    volumes = source_volumes(record)
    for volume in volumes:
        jobs.services[volume].lock(why)
    await asyncio.gather(*(nbd.detach(volume) for volume in volumes))


async def stop_mirrors(jobs: Jobs, record: JobRecord) -> dict[str, IntentStore]:
    """Stop every mirror of ``record``; their logs (closed) by target."""
    stores = {}
    for mirror in record.mirrors:
        running = jobs.mirrors.get((record.name, mirror.target))
        if running is not None:
            stores[mirror.target] = running.store
        await jobs.mirrors.stop((record.name, mirror.target), None)
    return stores


def owed(bitmap: DirtyBitmap) -> tuple[str, int]:
    """(the marked regions as a target record keeps them, their region size); ("", 0) when
    nothing is marked."""
    if not bitmap.marked_count:
        return "", 0
    return base64.b64encode(zlib.compress(bitmap.to_bytes())).decode(), bitmap.region_size


def byte_runs(bitmap: DirtyBitmap) -> list[tuple[int, int]]:
    """The marked regions as (offset, length) byte ranges."""
    size = bitmap.region_size
    return [(first * size, count * size) for first, count in bitmap.runs()]
