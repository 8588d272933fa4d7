"""What the config modules share: strict scalar validators, the table base, keyed problems.

How this works: every scalar field of the config has a plain validator that accepts only the
TOML type it expects (no silent coercion) and raises ``ValueError`` with a message that reads
well after the key path; ``show`` renders the offending value as it is written in TOML. The
validators used by both config.py (node, volumes, peers, tls) and config_jobs.py (``[[job]]``)
live here, with ``Table``, the frozen, unknown-keys-forbidden base of every table. A list
validator that knows which key of an item is at fault raises ``KeyedProblems`` with key paths
relative to its own; config.py turns each into one line naming that key. This module imports
neither of the two, so each can import it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator

from volkeeper.core.units import parse_size

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", re.ASCII)
NAME_RULE = '1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit'


def show(value: object) -> str:
    """Render a TOML value the way it would be written in the file."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def as_string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def as_name(value: object) -> str:
    text = as_string(value)
    if not NAME_RE.fullmatch(text):
        raise ValueError(f"expected {NAME_RULE}, got {show(value)}")
    return text


def as_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'expected a number of bytes or a size like "1GiB", got {show(value)}')
    size = parse_size(value)
    if size == 0:
        raise ValueError("must be larger than 0 bytes")
    return size


Name = Annotated[str, PlainValidator(as_name)]
Size = Annotated[int, PlainValidator(as_size)]


class KeyedProblems(ValueError):
    """Problems of a validated list, each as (key path relative to the list, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def ranged(low: float, high: float, integer: bool = False, unit: str = "") -> Any:
    """A validator of a number from ``low`` to ``high`` (a whole one with ``integer``)."""
    kinds = int if integer else int | float
    what = "a whole number" if integer else "a number of seconds"

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"expected {what}, got {show(value)}")
        if not low <= value <= high:  # nan and inf fail this too
            raise ValueError(f"must be from {low:g} to {high:g}{unit}, got {show(value)}")
        return value if integer else float(value)

    return PlainValidator(check)
