"""The resource agent against real daemons: ocf-tester's checks, each action's exit code,
and the promotion scores it would give (DRBD's ladder)."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import NodeFactory, need
from tests.support.mirroring import wait_state
from tests.support.topologies import two_way_pair, volume, wait_mirror
from volkeeper.ocf import agent
from volkeeper.ocf.install import install
from volkeeper_lab.launcher import LocalNode

SIZE = "16MiB"


def pair(start_node: NodeFactory, **job: object) -> tuple[LocalNode, LocalNode]:
    return two_way_pair(start_node, SIZE, **job)


def env(node: LocalNode, tmp_path: Path, job: str = "web") -> dict[str, str]:
    control = f"unix:{node.control_socket}"
    return {**os.environ, "OCF_RESKEY_job": job, "OCF_RESKEY_control": control,
            "HA_RSCTMP": str(tmp_path / f"rsctmp-{node.name}")}  # fmt: skip


def run(action: str, environment: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-m", "volkeeper.ocf.agent", action],
                          env=environment, capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode not in (0, 7, 8):
        print(f"agent {action} -> {done.returncode}:\n{done.stderr}")
    return done.returncode


def test_meta_data_is_an_ocf_promotable_agent() -> None:
    root = ET.fromstring(agent.META_DATA)
    actions = {a.get("name") for a in root.iter("action")}
    assert {"start", "stop", "monitor", "promote", "demote", "notify", "meta-data",
            "validate-all"} <= actions  # fmt: skip
    assert root.find("version") is not None and root.find("version").text == "1.1"  # type: ignore[union-attr]
    assert [p.get("name") for p in root.iter("parameter") if p.get("required") == "1"] == ["job"]


def test_ocf_tester_passes(start_node: NodeFactory, tmp_path: Path) -> None:
    need("ocf-tester")
    alpha, beta = pair(start_node)
    wait_state(alpha, "Mirroring")
    launcher = install()  # where Pacemaker looks (as `volkeeper ocf install` does)
    done = subprocess.run(
        ["ocf-tester", "-n", "vk", "-o", "job=web", "-o", f"control=unix:{beta.control_socket}",
         str(launcher)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OCF_ROOT": "/usr/lib/ocf", "HA_RSCTMP": str(tmp_path / "rsctmp")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed all tests" in done.stdout, done.stdout


def test_each_action_says_what_the_node_is(start_node: NodeFactory, tmp_path: Path) -> None:
    alpha, beta = pair(start_node)
    wait_state(alpha, "Mirroring")
    on_alpha, on_beta = env(alpha, tmp_path), env(beta, tmp_path)
    assert run("monitor", on_alpha) == agent.RUNNING_PROMOTED  # a probe sees the source
    assert run("monitor", on_beta) == agent.NOT_RUNNING  # not started here yet
    assert run("start", on_beta) == agent.SUCCESS
    assert run("monitor", on_beta) == agent.SUCCESS
    assert agent.Agent(on_beta).target_score(agent.Agent(on_beta).role()[1]) == 1000
    assert run("start", env(beta, tmp_path, job="nothere")) == agent.ERR_CONFIGURED
    assert run("validate-all", {**on_beta, "OCF_RESKEY_job": ""}) == agent.ERR_CONFIGURED
    # the cluster manager moves the job: demote the source, promote the target
    assert run("start", on_alpha) == agent.SUCCESS
    assert run("demote", on_alpha) == agent.SUCCESS
    assert volume(alpha)["locked"] and run("monitor", on_alpha) == agent.SUCCESS
    assert run("promote", on_beta) == agent.SUCCESS
    assert volume(beta)["role"] == "source" and volume(alpha)["role"] == "target"
    assert run("monitor", on_beta) == agent.RUNNING_PROMOTED
    assert run("monitor", on_alpha) == agent.SUCCESS
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    # the source goes away: the target's promotion is a failover
    beta.kill()
    scores = agent.Agent(on_alpha)
    assert scores.target_score(scores.role()[1]) in (100, 1000)
    assert run("promote", on_alpha) == agent.SUCCESS
    assert volume(alpha)["role"] == "source"


def test_a_stale_copy_gets_no_promotion_score(start_node: NodeFactory, tmp_path: Path) -> None:
    alpha, beta = pair(start_node, throttle="1MiB")  # a long full resync: Inconsistent
    wait_mirror(alpha, "web", "beta:data1", "Resyncing")
    stale = agent.Agent(env(beta, tmp_path))
    assert stale.target_score(stale.role()[1]) is None
    alpha.kill()
    assert stale.target_score(stale.role()[1]) is None
    assert run("promote", env(beta, tmp_path)) == agent.ERR_GENERIC
    assert volume(beta)["role"] == "target"


def test_install_writes_an_executable_launcher(tmp_path: Path) -> None:
    launcher = install(tmp_path)
    assert launcher == tmp_path / "resource.d" / "volkeeper" / "job"
    assert os.access(launcher, os.X_OK)
    done = subprocess.run(["sh", str(launcher), "meta-data"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and '<resource-agent name="job"' in done.stdout
    assert install(tmp_path) == launcher  # idempotent
