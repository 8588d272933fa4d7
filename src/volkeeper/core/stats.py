"""Per-volume I/O counters and latency histograms, cheap enough for the write path.

How this works: the NBD adapter calls ``VolumeStats.record(op, nbytes, seconds)`` once per
completed request; that is a few integer additions and one ``bisect`` on a fixed bucket list,
no locks and no Prometheus objects on the hot path.  The metrics exporter reads the plain
numbers when scraped.  Durations come in as arguments: this module never reads a clock.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

OPS = ("read", "write", "flush", "trim", "zero", "cache")
# Upper bounds in seconds, from 50 us (a cached read) to 10 s (a stuck disk); +Inf is implicit.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


@dataclass(slots=True)
class OpStats:
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def observe(self, nbytes: int, seconds: float) -> None:
        self.requests += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, count of observations <= bound) pairs, ending with +Inf."""
        bounds = [*LATENCY_BUCKETS, float("inf")]
        running, out = 0, []
        for bound, count in zip(bounds, self.buckets, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class VolumeStats:
    ops: dict[str, OpStats] = field(default_factory=lambda: {op: OpStats() for op in OPS})

    def record(self, op: str, nbytes: int, seconds: float, *, failed: bool = False) -> None:
        stats = self.ops[op]
        stats.observe(nbytes, seconds)
        if failed:
            stats.errors += 1


class RateMeter:
    """Bytes per second of a growing total over the last ``window`` seconds.

    ``sample`` is called as the total grows (it keeps at most one sample per ``spacing``);
    ``rate`` trims samples older than the window, keeping the newest of them as the base.
    """

    def __init__(self, window: float = 5.0, spacing: float = 0.25) -> None:
        self.window, self.spacing = window, spacing
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, now: float, total: int) -> None:
        if not self._samples or now - self._samples[-1][0] >= self.spacing:
            self._samples.append((now, total))

    def rate(self, now: float, total: int) -> float:
        samples = self._samples
        while len(samples) > 1 and now - samples[1][0] >= self.window:
            samples.popleft()
        if not samples or now <= samples[0][0]:
            return 0.0
        return (total - samples[0][1]) / (now - samples[0][0])
