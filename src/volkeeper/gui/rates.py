"""Rates for the GUI's charts, from the counters of successive status answers.

How this works: every answer of a node's ``/status`` adds a ``Point``: the time it came and the
counters that only grow -- bytes applications wrote to each volume, payload and wire bytes each
source-side mirror sent.  A rate is the difference of two points over their time apart; a
counter that went down (the daemon restarted) gives no rate for that step rather than a
negative one.  ``job_rates`` answers, per step, the application's write rate on the job's source
volume, and the payload and wire rates of the job's mirrors together; the compression ratio is
payload over wire.  Nothing here does I/O: times come in with the answers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

SAMPLES_KEPT = 180  # three minutes at one poll a second


@dataclass(frozen=True)
class Point:
    time: float
    written: dict[str, int]  # volume -> bytes written by clients
    sent: dict[tuple[str, str], int]  # (job, target) -> payload bytes sent
    wire: dict[tuple[str, str], int]  # (job, target) -> bytes on the wire


@dataclass(frozen=True)
class Rate:
    time: float
    app_bytes_per_s: float
    payload_bytes_per_s: float
    wire_bytes_per_s: float

    @property
    def compression_ratio(self) -> float | None:
        if self.wire_bytes_per_s <= 0:
            return None
        return self.payload_bytes_per_s / self.wire_bytes_per_s


class Samples:
    def __init__(self, keep: int = SAMPLES_KEPT) -> None:
        self.points: deque[Point] = deque(maxlen=keep)

    def add(self, now: float, status: dict[str, Any]) -> None:
        written = {v["name"]: int(v.get("written_bytes") or 0) for v in status["volumes"]}
        sent: dict[tuple[str, str], int] = {}
        wire: dict[tuple[str, str], int] = {}
        for mirror in status["mirrors"]:
            if mirror.get("role") == "source":
                key = (mirror["job"], mirror["target"])
                sent[key] = int(mirror.get("sent_bytes") or 0)
                wire[key] = int(mirror.get("wire_bytes") or 0)
        self.points.append(Point(now, written, sent, wire))

    def job_rates(self, job: str, volume: str) -> list[Rate]:
        rates = []
        for before, after in pairwise(self.points):
            seconds = after.time - before.time
            keys = [key for key in after.sent if key[0] == job and key in before.sent]
            if seconds <= 0 or volume not in after.written or volume not in before.written:
                continue
            app = after.written[volume] - before.written[volume]
            payload = sum(after.sent[key] - before.sent[key] for key in keys)
            wire = sum(after.wire[key] - before.wire.get(key, 0) for key in keys)
            if min(app, payload, wire) < 0:
                continue  # the daemon restarted between the two: its counters began again
            rates.append(Rate(after.time, app / seconds, payload / seconds, wire / seconds))
        return rates
