"""`volkeeper plan`: a volume's write rate through the node, and what a mirror of it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import NodeFactory
from tests.support.mirroring import cli, fio, start_fio
from volkeeper_lab.launcher import VolumeSpec

pytestmark = pytest.mark.serial  # measures a write rate: runs alone

MiB = 1024 * 1024
COMPRESSIBLE = (
    "--buffer_compress_percentage=70",
    "--refill_buffers",
    "--buffer_pattern=0xdeadbeef",
)


def test_plan_measures_the_write_rate_and_the_compression_of_the_volume_data(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha = start_node("alpha", [VolumeSpec("data1", "64MiB")])
    # The volume's own data: compressible about 3:1 everywhere (a sparse file would be zeros).
    fio(alpha.uri(), tmp_path, "--rw=write", "--bs=1M", "--size=64M", *COMPRESSIBLE)
    load, _ = start_fio(
        alpha.uri(), tmp_path, "--rw=randwrite", "--bs=64k", "--size=64M", "--rate=4m",
        "--time_based", "--runtime=30", *COMPRESSIBLE,
    )  # fmt: skip
    try:
        done = cli("plan", "data1", "--seconds", "5", "--json", "--node",
                   f"unix:{alpha.control_socket}")  # fmt: skip
    finally:
        load.kill()
        load.wait(10)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    write = answer["write"]
    assert 2.5 * MiB <= write["average_bytes_per_s"] <= 5.5 * MiB, write  # fio: 4 MiB/s
    assert write["average_bytes_per_s"] <= write["p95_bytes_per_s"] <= write["peak_bytes_per_s"]
    settings = {row["compression"]: row for row in answer["settings"]}
    assert set(settings) >= {"none", "lz4", "zstd:1", "zstd:3", "zlib:1", "zlib:9"}
    assert settings["none"]["ratio"] == 1.0
    assert settings["none"]["average_bytes_per_s"] == write["average_bytes_per_s"]
    for name in ("zstd:3", "zlib:1", "lz4"):
        row = settings[name]
        assert 1.8 <= row["ratio"] <= 6, row  # fio's 70% compressible buffers
        needed = write["average_bytes_per_s"] / row["ratio"]
        assert abs(row["average_bytes_per_s"] - needed) <= 0.02 * needed + 1, row
        assert row["compress_bytes_per_s_per_core"] > 10 * MiB, row
    assert answer["sample_bytes"] >= 8 * MiB

    human = cli("plan", "data1", "--seconds", "1", "--node", f"unix:{alpha.control_socket}")
    assert human.returncode == 0, human.stderr
    assert "bandwidth a mirror needs" in human.stdout and "zstd:3" in human.stdout


def test_plan_refuses_bad_requests(start_node: NodeFactory) -> None:
    alpha = start_node("alpha", [VolumeSpec("data1", "16MiB")])
    with alpha.api() as api:
        missing = api.get("/volumes/nope/plan", params={"seconds": 1})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
        too_long = api.get("/volumes/data1/plan", params={"seconds": 0})
        assert too_long.status_code == 400, too_long.text
        assert "seconds" in too_long.json()["error"]["message"]
