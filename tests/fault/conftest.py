"""The nemesis needs root (namespaces, iptables), FUSE and libnbd's Python bindings."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.mirroring import python_with_libnbd


@pytest.fixture
def nemesis_host() -> None:
    """Skips a test of the nemesis on a machine that cannot run it."""
    missing = [p for p in ("ip", "iptables", "tc") if shutil.which(p) is None]
    if os.geteuid() != 0 or missing or not os.path.exists("/dev/fuse"):
        pytest.skip(f"the nemesis needs root, /dev/fuse and {missing or 'ip, iptables, tc'}")
    if python_with_libnbd() is None:
        pytest.skip("no python3 imports libnbd's bindings (python3-libnbd)")
