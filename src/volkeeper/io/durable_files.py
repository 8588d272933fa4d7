"""Small files that must survive a power loss: job and target records.

How this works: ``write_json`` writes a temporary file beside the real one, fsyncs it,
renames it over the real one and fsyncs the directory, so a reader finds either the old
document or the new one, never a torn one, and the rename itself is on stable storage.
``remove`` unlinks and fsyncs the directory.  These run on the event loop: each costs a
few milliseconds, and only administrator commands and rare state changes call them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
