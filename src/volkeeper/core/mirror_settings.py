"""A mirror's settings: declared once, checked once, carried whole.

How this works: ``MirrorSettings`` is the one frozen value that every layer passes along.  The
API and the CLI build it from what people write (``from_text``: sizes like "64MiB", rates like
"100MiB/s" or "none"), the node config's ``[[job.mirror]]`` tables and the job record hold one,
the running mirror keeps one in its spec, and the link's sender reads its rates from it.
``checked()`` returns the value normalised (compression spelled one way) or raises
``ValueError`` whose message starts with the field at fault; ``changed(**fields)`` is a live
change (``mirror set``), checked, and refuses the settings that cannot change on a running
mirror (the region size is the intent log's geometry).  The one default that depends on
another setting lives here too: ``resync_floor``.  Adding a setting is one field here plus
its use (and, to be settable, a key in the API and config schemas, which document it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from volkeeper.core.bitmap import MIN_REGION_SIZE, image_size
from volkeeper.core.compression_setting import NO_COMPRESSION, parse_compression
from volkeeper.core.units import parse_rate, parse_size

MODES = ("sync", "async")
DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024  # async mode: bytes sent and not yet ACKed, at most
MIN_QUEUE_LIMIT = 1024 * 1024
UNLIMITED = ("none", "off", "unlimited")  # what people write for "no rate limit"
# Which settings a running mirror can change, which are sizes and which are rates.  Module
# constants, not ClassVars: mypyc would make a ClassVar of a dataclass a field (mypyc#1122).
LIVE_SETTINGS = ("mode", "queue_limit", "compression", "throttle", "resync_min", "resync_max")
SIZE_SETTINGS = ("queue_limit", "region_size")
RATE_SETTINGS = ("throttle", "resync_min", "resync_max")


@dataclass(frozen=True)
class MirrorSettings:
    mode: str = "sync"
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # async: bytes sent and not yet ACKed, at most
    compression: str = NO_COMPRESSION
    throttle: int | None = None  # bytes per second on the wire; None: unthrottled
    resync_min: int | None = None  # bytes per second a resync gets under load
    resync_max: int | None = None  # bytes per second a resync never exceeds
    region_size: int = MIN_REGION_SIZE  # intent-log bytes per bitmap bit

    @classmethod
    def from_text(cls, **fields: Any) -> MirrorSettings:
        """Settings from what people write: sizes and rates as numbers or text; a rate of
        None or "none" is no limit.  Fields not given keep their defaults.  Checked."""
        return cls(**parse_fields(fields)).checked()

    def checked(self) -> MirrorSettings:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.queue_limit < MIN_QUEUE_LIMIT:
            raise ValueError(f"queue limit must be at least 1 MiB, got {self.queue_limit}")
        try:
            compression = parse_compression(self.compression)
        except ValueError as exc:
            raise ValueError(f"compression: {exc}") from None
        for name in RATE_SETTINGS:
            rate = getattr(self, name)
            if rate is not None and rate <= 0:
                raise ValueError(f"{name} must be a positive rate, got {rate}")
        if self.resync_min and self.resync_max and self.resync_min > self.resync_max:
            raise ValueError(f"resync_min {self.resync_min} is above resync_max {self.resync_max}")
        try:
            image_size(MIN_REGION_SIZE, self.region_size)  # the bitmap's own check
        except ValueError as exc:
            raise ValueError(f"region_size: {exc}") from None
        return dataclasses.replace(self, compression=compression)

    def changed(self, **changes: Any) -> MirrorSettings:
        """These settings with ``changes`` (already parsed) made, checked."""
        fixed = sorted(set(changes) - set(LIVE_SETTINGS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: cannot be changed on a mirror")
        return dataclasses.replace(self, **changes).checked()

    def live(self) -> dict[str, Any]:
        """The settings a running mirror can change, by name (for events and comparisons)."""
        return {name: getattr(self, name) for name in LIVE_SETTINGS}

    @property
    def resync_floor(self) -> int | None:
        """What a resync gets under load: resync_min, else a tenth of a throttle, else no
        guarantee (an unthrottled link has room for it)."""
        if self.resync_min:
            return self.resync_min
        return self.throttle // 10 if self.throttle else None


NAMES = tuple(field.name for field in dataclasses.fields(MirrorSettings))


def parse_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Sizes and rates among ``fields`` parsed from text; ValueError names the field."""
    parsed = dict(fields)
    for name, value in fields.items():
        try:
            if name in SIZE_SETTINGS:
                parsed[name] = parse_size(value)
            elif name in RATE_SETTINGS:
                parsed[name] = None if value is None or value in UNLIMITED else parse_rate(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return parsed
