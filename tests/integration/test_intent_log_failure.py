"""An intent log that cannot be written while mirroring: the mirror breaks, both nodes say so,
the application's writes go on, and once the disk is healed a full resync repairs it.

Before: the mirror went Broken but kept its link, so the target went on showing Mirroring and
UpToDate while the source no longer sent it anything; the application's writes hung, retrying
the failed activity-log write, until the disk was healed; and a full resync then stayed in
Resync pending (the link that should carry it was never dropped)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.support.mirroring import (
    cli,
    mirror_view,
    mirrored_pair,
    random_file,
    stop_both_and_compare,
    wait_state,
)

MiB = 1 << 20


def test_a_failing_intent_log_breaks_the_mirror_and_the_target_knows(
    failing_disk: PowerLossDisk, start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = mirrored_pair(start_node, bitmap_dir=failing_disk.mountpoint)
    failing_disk.command("fail EIO write fsync")
    data = random_file(tmp_path / "data.bin", 64 * MiB)  # every extent: cold ones need the log
    copy = subprocess.Popen(["nbdcopy", str(data), alpha.uri()])
    try:
        assert copy.wait(timeout=60) == 0  # the writes do not wait for a log that failed
    finally:
        copy.kill()
    source = mirror_view(alpha)
    assert source["state"] == "Broken", source
    assert "the intent log cannot be written" in source["last_error"], source
    deadline = time.monotonic() + 10
    while (target := mirror_view(beta))["state"] != "Broken":
        assert time.monotonic() < deadline, target  # never Mirroring while it gets nothing
        time.sleep(0.05)
    assert target["data_state"] == "Outdated", target
    failing_disk.command("heal")
    control = f"unix:{alpha.control_socket}"
    assert cli("mirror", "resync", "web", "--full", "--node", control).returncode == 0
    wait_state(alpha, "Mirroring", timeout=60)
    assert mirror_view(alpha)["last_error"] is None
    stop_both_and_compare(alpha, beta)
