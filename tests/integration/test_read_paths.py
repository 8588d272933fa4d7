"""Reads that miss the page cache, by io_uring (the default) and by worker threads
(``io_uring = false``): a real client reads the whole volume back right either way."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, need
from volkeeper_lab.launcher import VolumeSpec

SIZE = 32 << 20


@pytest.mark.parametrize(("io_uring", "path"), [(True, "io_uring"), (False, "worker threads")])
def test_a_cold_volume_reads_back_whole(
    start_node: NodeFactory, tmp_path: Path, io_uring: bool, path: str
) -> None:
    need("nbdcopy")
    image = tmp_path / "data1.img"
    image.write_bytes(os.urandom(SIZE))
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: cold reads
    finally:
        os.close(fd)
    node = start_node(volumes=[VolumeSpec("data1", size=SIZE, path=image)],
                      node_settings={"io_uring": io_uring})  # fmt: skip
    assert f"reads that miss the page cache: {path}" in node.log_text()
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", "--requests=32", node.uri(), str(copy)], check=True, timeout=60)
    digest = hashlib.sha256
    assert digest(copy.read_bytes()).digest() == digest(image.read_bytes()).digest()
