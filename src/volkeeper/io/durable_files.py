"""Small files that must survive a power loss: job and target records.

How this works: ``write_json`` writes a temporary file beside the real one, fsyncs it,
renames it over the real one and fsyncs the directory, so a reader finds either the old
document or the new one, never a torn one, and the rename itself is on stable storage.
``remove`` unlinks and fsyncs the directory.  These run on the event loop: each costs a
few milliseconds, and only administrator commands and rare state changes call them.
``WatchedFile`` reads a small file again only when it changed (its mtime or size): the
files the CLI writes while the daemon runs (pins, tokens), asked at each connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def write_json(path: Path, document: Any) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("w") as handle:
        json.dump(document, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    sync_directory(path.parent)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WatchedFile(Generic[T]):
    """``parse(path)`` of the file at ``path``, kept until the file changes; ``missing``
    while there is none."""

    def __init__(self, path: Path, parse: Callable[[Path], T], missing: T) -> None:
        self.path = path
        self._parse = parse
        self._missing = missing
        self._seen: tuple[int, int] | None = None
        self._value = missing

    def read(self) -> T:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._value = None, self._missing
            return self._missing
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._value = self._parse(self.path)
            self._seen = seen
        return self._value
