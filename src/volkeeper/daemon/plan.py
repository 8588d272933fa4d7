"""`volkeeper plan`: how much bandwidth a mirror of a volume needs, measured before deploying.

How this works: the review of DataKeeper advises watching a volume's "Disk Write Bytes/sec"
before mirroring it; this does that through volkeeper itself.  ``plan`` samples the volume's
written-bytes counter (every NBD write passes through the node) once a second for the
requested time: average, 95th percentile and peak write rate.  Then it reads ``SAMPLES``
pieces of the volume's own data at random places (on the reader threads) and compresses them
with each setting a mirror can use (on a worker thread, timed), giving each codec's ratio and
speed.  The bandwidth a mirror needs is the write rate divided by the ratio; the CPU it costs
at the peak is the peak rate divided by the codec's speed on one core.  A volume nobody writes
while it runs gets rates of zero: the answer says so rather than guess.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from volkeeper.io.codecs import compressor_for
from volkeeper.io.volume_service import VolumeService
from volkeeper.io.workers import IoWorkers

SETTINGS = ("none", "lz4", "zstd:1", "zstd:3", "zstd:9", "zlib:1", "zlib:6", "zlib:9")
SAMPLES = 64
SAMPLE_BYTES = 256 * 1024
MAX_SECONDS = 3600.0


def rate_summary(per_second: list[float]) -> dict[str, float]:
    """Average, 95th percentile and peak of per-second write rates (bytes/s)."""
    if not per_second:
        return {"average_bytes_per_s": 0.0, "p95_bytes_per_s": 0.0, "peak_bytes_per_s": 0.0}
    ordered = sorted(per_second)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {
        "average_bytes_per_s": statistics.fmean(per_second),
        "p95_bytes_per_s": p95,
        "peak_bytes_per_s": ordered[-1],
    }


async def plan(service: VolumeService, readers: IoWorkers, seconds: float) -> dict[str, Any]:
    rates = await _write_rates(service, seconds)
    sample = await _sample(service, readers)
    loop = asyncio.get_running_loop()
    settings = []
    for setting in SETTINGS:
        packed, took = await loop.run_in_executor(None, _compress, setting, sample)
        ratio = len(sample) / packed if packed else 1.0
        speed = len(sample) / took if took > 0 else None
        settings.append({
            "compression": setting,
            "ratio": round(ratio, 2),
            "average_bytes_per_s": round(rates["average_bytes_per_s"] / ratio),
            "p95_bytes_per_s": round(rates["p95_bytes_per_s"] / ratio),
            "peak_bytes_per_s": round(rates["peak_bytes_per_s"] / ratio),
            "compress_bytes_per_s_per_core": round(speed) if speed else None,
            "cores_at_peak": round(rates["peak_bytes_per_s"] / speed, 3) if speed else 0.0,
        })  # fmt: skip
    return {
        "volume": service.name,
        "seconds": seconds,
        "write": {key: round(value) for key, value in rates.items()},
        "sample_bytes": len(sample),
        "settings": settings,
    }


async def _write_rates(service: VolumeService, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    written = service.stats.ops["write"]
    last_time, last_bytes = loop.time(), written.bytes
    per_second = []
    for _ in range(max(1, round(seconds))):
        await asyncio.sleep(1.0)
        now, total = loop.time(), written.bytes
        per_second.append((total - last_bytes) / (now - last_time))
        last_time, last_bytes = now, total
    return rate_summary(per_second)


async def _sample(service: VolumeService, readers: IoWorkers) -> bytes:
    """``SAMPLES`` pieces of the volume at random places (the whole volume if smaller)."""
    size = service.volume.size
    count = max(1, min(SAMPLES, size // SAMPLE_BYTES))
    length = min(SAMPLE_BYTES, size)
    slots = (size - length) // 4096
    offsets = sorted(random.sample(range(slots + 1), min(count, slots + 1)))
    loop = asyncio.get_running_loop()
    pieces = []
    for slot in offsets:
        done: asyncio.Future[bytes] = loop.create_future()

        def read(result: object, error: BaseException | None, done: Any = done) -> None:
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(bytes(result))  # type: ignore[call-overload]

        readers.submit(service.volume.read, (slot * 4096, length), read)
        pieces.append(await done)
    return b"".join(pieces)


def _compress(setting: str, data: bytes) -> tuple[int, float]:
    """(compressed size, seconds) of ``data`` in 256 KiB pieces, as a mirror would send it."""
    compressor = compressor_for(setting)
    if compressor is None:
        return len(data), 0.0
    started, packed = time.perf_counter(), 0
    for start in range(0, len(data), SAMPLE_BYTES):
        piece = data[start : start + SAMPLE_BYTES]
        out = compressor.compress(piece)
        packed += len(out) if out is not None else len(piece)
    return packed, time.perf_counter() - started
