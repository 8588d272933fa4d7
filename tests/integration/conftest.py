"""Fixtures of the end-to-end tests that more than one module uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.powerloss_fs import PowerLossDisk


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[PowerLossDisk]:
    """A powerloss_fs FUSE disk, mounted, to be told ``fail ERRNO OP...`` and ``heal``; it
    outlives the daemons (ask for it before ``start_node``), then syncs and goes."""
    disk = PowerLossDisk(tmp_path / "backing", tmp_path / "disk", tmp_path / "disk.log")
    disk.start()
    yield disk
    disk.shutdown()
