"""The nemesis's schedule: which faults, on which role, for how long -- all from one seed.

How this works: ``schedule(seed, count, targets)`` draws ``count`` faults with
``random.Random(seed)`` alone, so the same seed always gives the same schedule (the timing of a
run varies; what is done, to whom and in which order does not).  A fault names a *role*
(``source``, or a target by index), not a node: after a switchover or a failover the same
schedule still makes sense, and the runner resolves the role when the fault starts.

Every kind is one line of ``KINDS``: whether it strikes a target's side (then the
application must see no failed write, and no write may wait longer than the peer timeout
allows: ``TARGET_SIDE``) and how its parameters are drawn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Draw = Callable[[random.Random], dict[str, Any]]


OPS = ["write", "fsync", "write fsync"]  # a disk's operations that fail
CODECS = ["zstd:3", "lz4", "zlib:1"]
RATES = ["2MiB", "16MiB"]


def _none(_: random.Random) -> dict[str, Any]:
    return {}


def _errno(chosen: random.Random) -> str:
    return chosen.choice(["EIO", "ENOSPC"])


def _power(chosen: random.Random) -> dict[str, Any]:
    """How much of the disk's cache survives (none, or a seeded half of its pages)."""
    return {"fraction": chosen.choice([0.0, 0.5]), "seed": chosen.randrange(1 << 16)}


KINDS: dict[str, tuple[bool, Draw]] = {
    # kind: (strikes a target's side, its parameters)
    "partition": (True, _none),
    "partition_one_way": (True, lambda r: {"from_source": r.random() < 0.5}),
    "shape": (True, lambda r: {"rate": r.choice(["2mbit", "8mbit", "32mbit"])}),
    "delay": (True, lambda r: {"ms": r.choice([5, 40, 150])}),
    "kill_target": (True, _none),
    "freeze_target": (True, _none),
    "restart_target": (True, _none),
    "power_cut_target": (True, lambda r: _power(r)),
    "disk_error_target": (True, lambda r: {"errno": _errno(r), "ops": r.choice(OPS)}),
    "slow_disk_target": (True, lambda r: {"ms": r.choice([2, 10, 40])}),
    "hang_disk_target": (True, _none),
    "settings": (True, lambda r: {"compression": r.choice(CODECS), "throttle": r.choice(RATES)}),
    "kill_source": (False, _none),
    "freeze_source": (False, _none),
    "restart_source": (False, _none),
    "power_cut_source": (False, lambda r: _power(r)),
    "disk_error_source": (False, lambda r: {"errno": _errno(r), "ops": "write"}),
    "volume_error_source": (False, lambda r: {"errno": _errno(r)}),
    "slow_disk_source": (False, lambda r: {"ms": r.choice([2, 10])}),
    "switchover": (False, _none),
    "failover": (False, _none),
}  # fmt: skip
TARGET_SIDE = frozenset(kind for kind, (target_side, _) in KINDS.items() if target_side)


@dataclass(frozen=True)
class Fault:
    kind: str
    target: int  # which target (0 or 1) the fault strikes or names, if it strikes one
    duration: float  # seconds the fault lasts before it is healed
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}[t{self.target}] {self.duration:.1f}s {extra}".strip()


def schedule(seed: int, count: int, targets: int, kinds: list[str] | None = None) -> list[Fault]:
    chosen = random.Random(seed)
    names = kinds or sorted(KINDS)
    faults = []
    for _ in range(count):
        kind = chosen.choice(names)
        target = chosen.randrange(targets)
        duration = round(chosen.uniform(1.0, 5.0), 1)
        faults.append(Fault(kind, target, duration, KINDS[kind][1](chosen)))
    return faults


def describe(faults: list[Fault]) -> str:
    return json.dumps([asdict(fault) for fault in faults])
