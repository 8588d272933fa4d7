"""Byte sizes and transfer rates, as administrators write them.

How this works: a size is a number (``1``, ``1.5``) followed by an optional unit. ``K``, ``M``,
``G``, ``T`` and their ``KiB``..``TiB`` spellings are powers of 1024; ``KB``..``TB`` are powers
of 1000; ``B`` or no unit means bytes. Units are case-insensitive and may be separated from the
number by spaces. Arithmetic is exact (``Fraction``), so ``1.5GiB`` is accepted but ``0.3K``
(307.2 bytes) is refused. A rate is a size with an optional ``/s`` suffix, in bytes per second.
``format_size`` picks the largest binary unit and one decimal; it inverts ``parse_size`` exactly
whenever the size is a whole number of tenths of that unit.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def _unit_multipliers() -> dict[str, int]:
    """Map every accepted unit spelling, lower-cased, to its number of bytes."""
    multipliers = {"": 1, "b": 1}
    for power, unit in enumerate(_BINARY_UNITS, start=1):
        letter = unit[0].lower()
        for spelling in (letter, letter + "i", letter + "ib"):
            multipliers[spelling] = 1024**power
        multipliers[letter + "b"] = 1000**power
    return multipliers


_MULTIPLIERS = _unit_multipliers()
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)
_RATE_SUFFIX_RE = re.compile(r"\s*/\s*s\s*\Z", re.ASCII | re.IGNORECASE)

_SIZE_FORM = 'a size like 4096, "4KiB", "512 MiB" or "1G"'
_RATE_FORM = 'a rate like 1048576, "100MiB/s" or "10M"'


def parse_size(text: str | int) -> int:
    """Return the number of bytes ``text`` denotes; ``ValueError`` names the text if invalid."""
    return _parse_bytes(text, _SIZE_FORM)


def parse_rate(text: str | int) -> int:
    """Return the bytes per second ``text`` denotes (a size, optionally followed by ``/s``).

    A rate must be positive: a throttle of zero would stall replication for good, so callers
    that want "unlimited" should express it explicitly (for example as ``None``).
    """
    stripped = _RATE_SUFFIX_RE.sub("", text) if isinstance(text, str) else text
    rate = _parse_bytes(stripped, _RATE_FORM, original=text)
    if rate == 0:
        raise ValueError(f"expected {_RATE_FORM}, got {_show(text)}: a rate must be positive")
    return rate


def format_size(n: int) -> str:
    """Render ``n`` bytes for humans: ``"512 B"``, ``"1.0 GiB"``, ``"1.5 MiB"``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"a size must be a non-negative integer, got {n!r}")
    if n < 1024:
        return f"{n} B"
    power = 1
    while power < len(_BINARY_UNITS) and _tenths(n, power) >= 10240:
        power += 1
    tenths = _tenths(n, power)
    return f"{tenths // 10}.{tenths % 10} {_BINARY_UNITS[power - 1]}"


def _parse_bytes(text: str | int, form: str, original: str | int | None = None) -> int:
    shown = _show(text if original is None else original)
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"expected {form}, got {shown}: must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected {form}, got {shown}")
    if text.lstrip().startswith("-"):
        raise ValueError(f"expected {form}, got {shown}: must not be negative")
    match = _SIZE_RE.fullmatch(text)
    multiplier = _MULTIPLIERS.get(match.group(2).lower()) if match else None
    if match is None or multiplier is None:
        raise ValueError(f"expected {form}, got {shown}")
    value = Fraction(match.group(1)) * multiplier
    if value.denominator != 1:
        raise ValueError(f"expected {form}, got {shown}: not a whole number of bytes")
    return int(value)


def _tenths(n: int, power: int) -> int:
    """``n / 1024**power`` in tenths, rounded half up, in exact integer arithmetic."""
    unit: int = 1024**power
    return (20 * n + unit) // (2 * unit)


def _show(value: object) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
