"""Switchover with real daemons: the job's source moves to a target node and back, under a
client that keeps writing and follows the source; nothing acknowledged is lost, nothing is
resent, and a switchover to a mirror that is not Mirroring is refused with the reason.

The writer (tests/support/acked_writer.py) talks raw NBD to both nodes' sockets and moves to
whichever takes writes; at the end the volumes must be byte-identical and hold every write
the writer saw acknowledged.  "Nothing resent" is the source mirrors' ``resync_sent_bytes``:
zero on both sides.  The time from the request to the first write the new source took is
printed (a figure to report, not a test bound: bench/ has the measurement).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.conftest import NodeFactory
from tests.integration.powerloss_fs import PowerLossDisk
from tests.support.acked_writer import AckedWriter
from tests.support.mirroring import wait_state
from tests.support.topologies import (
    assert_identical,
    full_mesh,
    mirror,
    path,
    stop_in_order,
    two_way_pair,
    vk,
    vk_ok,
    volume,
    wait_mirror,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

SIZE = "32MiB"


def mirrored_two_way_pair(start_node: NodeFactory) -> tuple[LocalNode, LocalNode]:
    """alpha and beta, each in the other's [peers], job web (alpha:data1 -> beta:data1,
    sync) Mirroring."""
    alpha, beta = two_way_pair(start_node, SIZE, mode="sync")
    wait_state(alpha, "Mirroring")
    return alpha, beta


def switchover(node: LocalNode, to: str, job: str = "web") -> httpx.Response:
    with node.api() as api:
        return api.post(f"/jobs/{job}/switchover", json={"to": to}, timeout=60)


def test_switchover_and_back_under_writes(start_node: NodeFactory) -> None:
    alpha, beta = mirrored_two_way_pair(start_node)
    writer = AckedWriter([alpha.nbd_socket, beta.nbd_socket])
    writer.start()
    writer.wait_writes(300)

    started = time.monotonic()
    answer = switchover(alpha, "beta")
    assert answer.status_code == 200, answer.text
    assert answer.json()["new_source"] == "beta"
    before = writer.writes
    while writer.serving != beta.nbd_socket or writer.writes == before:
        assert time.monotonic() - started < 30, f"no write taken by beta: {writer.errors}"
        time.sleep(0.001)
    print(f"switchover alpha -> beta: first write on beta {time.monotonic() - started:.3f} s "
          f"after the request ({answer.json()['seconds']:.3f} s in the node)")  # fmt: skip
    assert volume(alpha)["role"] == "target" and volume(beta)["role"] == "source"
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    writer.wait_writes(writer.writes + 300)
    back = mirror(beta, "web", "alpha:data1")

    answer = switchover(beta, "alpha")
    assert answer.status_code == 200, answer.text
    writer.wait_writes(writer.writes + 300)
    assert writer.serving == alpha.nbd_socket and writer.switches >= 2
    again = wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    writer.finish()
    assert back["resync_sent_bytes"] == 0 and again["resync_sent_bytes"] == 0, (back, again)

    stop_in_order(alpha, beta)
    assert_identical(path(alpha), path(beta))
    writer.check(path(alpha))


def test_switchover_with_two_targets_keeps_each_mirrors_settings(start_node: NodeFactory) -> None:
    gamma, beta, alpha = full_mesh(start_node, "gamma", "beta", "alpha")
    mirrors = [
        {"source": "alpha:data1", "target": "beta:data1", "mode": "sync"},
        {"source": "alpha:data1", "target": "gamma:data1", "mode": "async",
         "compression": "zstd:3", "throttle": "64MiB"},
    ]  # fmt: skip
    with alpha.api() as api:
        created = api.post("/jobs", json={"name": "web", "mirrors": mirrors, "confirm": True})
    assert created.status_code == 201, created.text
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    wait_mirror(alpha, "web", "gamma:data1", "Mirroring")
    writer = AckedWriter([alpha.nbd_socket, beta.nbd_socket])
    writer.start()
    writer.wait_writes(300)

    said = vk_ok(alpha, "job", "switchover", "web", "--to", "beta")
    assert said.startswith("job web: beta is the source now, alpha a target"), said
    assert said.rstrip().endswith("mirrors to alpha:data1, gamma:data1"), said
    to_alpha = wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    to_gamma = wait_mirror(beta, "web", "gamma:data1", "Mirroring")
    assert (to_alpha["mode"], to_alpha["compression"], to_alpha["throttle"]) == (
        "sync", "none", None)  # fmt: skip
    assert (to_gamma["mode"], to_gamma["compression"], to_gamma["throttle"]) == (
        "async", "zstd:3", 64 << 20)  # fmt: skip
    writer.wait_writes(writer.writes + 300)
    assert writer.serving == beta.nbd_socket
    writer.finish()
    resent = [mirror(beta, "web", t)["resync_sent_bytes"] for t in ("alpha:data1", "gamma:data1")]
    assert resent == [0, 0]
    assert volume(gamma)["role"] == "target" and volume(alpha)["role"] == "target"

    stop_in_order(beta, alpha, gamma)
    assert_identical(path(beta), path(alpha), path(gamma))
    writer.check(path(beta))


def test_switchover_is_refused_with_the_reason(start_node: NodeFactory) -> None:
    alpha, beta = mirrored_two_way_pair(start_node)
    refused = switchover(alpha, "gamma")
    assert refused.status_code == 400
    assert "has no mirror to node 'gamma'" in refused.json()["error"]["message"]
    refused = switchover(beta, "gamma")  # asked of a target, for a third node
    assert refused.status_code == 409
    assert refused.json()["error"]["hint"] == "run the switchover on alpha or on gamma"
    with alpha.api() as api:
        assert api.post("/jobs/web/mirror/pause").status_code == 200
    refused = switchover(alpha, "beta")
    assert refused.status_code == 409
    assert "is Paused, not Mirroring" in refused.json()["error"]["message"]
    refused = switchover(beta, "beta")  # asked of the target: its source is not connected
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "beta:data1 is not connected to its source alpha" in error["message"]
    assert error["hint"] == "if alpha is gone for good, fail over: volkeeper volume promote data1"
    with alpha.api() as api:
        assert api.post("/jobs/web/mirror/continue").status_code == 200
    wait_state(alpha, "Mirroring")
    assert volume(alpha)["role"] == "source" and volume(alpha)["locked"] is None
    asked = switchover(beta, "beta")  # asked of the target, connected: its source hands over
    assert asked.status_code == 200 and asked.json()["new_source"] == "beta", asked.text
    assert volume(alpha)["role"] == "target"
    said = vk(beta, "job", "switchover", "web", "--to", "gamma")
    assert said.returncode == 1 and "has no mirror to node 'gamma'" in said.stderr


def test_a_new_source_that_cannot_take_over_changes_nothing(start_node: NodeFactory) -> None:
    """beta does not know gamma: the handover is refused there, and alpha keeps the job --
    its mirrors running again, its volume taking writes."""
    gamma = start_node("gamma", [VolumeSpec("data1", SIZE)])
    alpha_port = free_tcp_port()
    beta = start_node("beta", [VolumeSpec("data1", SIZE)], peers={"alpha": alpha_port})
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peer_port=alpha_port,
                       peers={"beta": beta.peer_port, "gamma": gamma.peer_port})  # fmt: skip
    body = {"name": "web", "source": "alpha:data1", "target": ["beta:data1", "gamma:data1"],
            "confirm": True}  # fmt: skip
    with alpha.api() as api:
        assert api.post("/jobs", json=body).status_code == 201
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    wait_mirror(alpha, "web", "gamma:data1", "Mirroring")

    refused = switchover(alpha, "beta")
    assert refused.status_code == 409, refused.text
    assert "node 'gamma' is not in beta's [peers]" in refused.json()["error"]["message"]
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    wait_mirror(alpha, "web", "gamma:data1", "Mirroring")
    assert volume(alpha)["role"] == "source" and volume(alpha)["locked"] is None
    assert volume(beta)["role"] == "target"
    writer = AckedWriter([alpha.nbd_socket])
    writer.start()
    writer.wait_writes(100)
    writer.finish()
    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta), path(gamma))


def test_a_switchover_cut_short_by_a_crash_ends_with_one_source(start_node: NodeFactory) -> None:
    """The state a crash can leave at each step of a switchover, made from copies of the
    nodes' files, ends the same way: beta the source, alpha its target, no resync.
    beta with a job record and its old target record (it crashed while taking over): the
    job record, of the later epoch, stands.  alpha with its old job record beside its
    target record (it crashed while becoming a target): the target record stands.  alpha
    with only its old job record and intent log (it crashed before anything of its own
    was written): beta refuses its mirror with SOURCE_MOVED and alpha becomes its target."""
    alpha, beta = mirrored_two_way_pair(start_node)
    state = {node.name: node.directory / "state" for node in (alpha, beta)}
    alpha.stop()  # a cleanly closed intent log: nothing marked
    job_record = (state["alpha"] / "jobs" / "web.json").read_bytes()
    intent_log = (state["alpha"] / "bitmaps" / "web@beta:data1.vkil").read_bytes()
    alpha.start()
    wait_state(alpha, "Mirroring")
    target_record = (state["beta"] / "targets" / "data1.json").read_bytes()
    assert switchover(alpha, "beta").status_code == 200
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")

    beta.stop()
    (state["beta"] / "targets" / "data1.json").write_bytes(target_record)
    beta.start()
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    assert volume(beta)["role"] == "source" and volume(beta)["locked"] is None
    assert "job taken over before a crash: its target record goes" in beta.log_text()

    alpha.stop()
    (state["alpha"] / "jobs" / "web.json").write_bytes(job_record)
    alpha.start()
    assert volume(alpha)["role"] == "target" and not (state["alpha"] / "jobs" / "web.json").exists()
    assert "job handed over before a crash: its record here goes" in alpha.log_text()
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")

    alpha.stop()
    (state["alpha"] / "jobs" / "web.json").write_bytes(job_record)
    (state["alpha"] / "bitmaps" / "web@beta:data1.vkil").write_bytes(intent_log)
    (state["alpha"] / "targets" / "data1.json").unlink()
    alpha.start()
    deadline = time.monotonic() + 20
    while volume(alpha)["role"] != "target":
        assert time.monotonic() < deadline, alpha.log_text()[-3000:]
        time.sleep(0.05)
    assert "another node is this job's source now" in alpha.log_text()
    back = wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    assert back["resync_sent_bytes"] == 0
    stop_in_order(beta, alpha)
    assert_identical(path(alpha), path(beta))


def test_a_handover_never_answered_keeps_the_volume_locked_until_it_is_known(
    failing_disk: PowerLossDisk, start_node: NodeFactory
) -> None:
    """beta takes the HANDOVER and hangs writing its intent log (its disk holds every fsync),
    then is killed: alpha cannot know whether beta took the job, so it keeps its volume
    locked, its mirrors running.  beta restarts without the job (its record was never
    written), alpha's mirror is admitted again: the switchover did not happen, alpha takes
    writes.  A second switchover then goes through, over the log the first one left."""
    alpha_port, beta_port = free_tcp_port(), free_tcp_port()
    beta = start_node("beta", [VolumeSpec("data1", SIZE)], peer_port=beta_port,
                      peers={"alpha": alpha_port}, bitmap_dir=failing_disk.mountpoint)  # fmt: skip
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peer_port=alpha_port,
                       peers={"beta": beta_port})  # fmt: skip
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
    with alpha.api() as api:
        assert api.post("/jobs", json=body).status_code == 201
    wait_state(alpha, "Mirroring")
    failing_disk.command("hold")
    answers: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answers.append(switchover(alpha, "beta")))
    asking.start()
    left = failing_disk.backing / "web@alpha:data1.vkil"
    deadline = time.monotonic() + 20
    while not left.exists():  # beta is writing the new log: the HANDOVER reached it
        assert time.monotonic() < deadline, "beta never began to take the job"
        time.sleep(0.01)
    assert beta.process is not None
    os.kill(beta.process.pid, signal.SIGKILL)  # it dies once its disk stops holding it
    failing_disk.power_loss()
    beta.kill()
    asking.join(60)
    assert answers and answers[0].status_code == 503, answers
    error = answers[0].json()["error"]
    assert "switchover of job 'web' undecided" in error["message"], error
    assert "switching over to beta" in (volume(alpha)["locked"] or "")

    failing_disk.start()
    beta.start()
    wait_state(alpha, "Mirroring")
    deadline = time.monotonic() + 20
    while volume(alpha)["locked"] is not None:
        assert time.monotonic() < deadline, volume(alpha)
        time.sleep(0.05)
    assert "switchover did not happen: the job stays here" in alpha.log_text()
    assert volume(beta)["role"] == "target"
    assert switchover(alpha, "beta").status_code == 200
    wait_mirror(beta, "web", "alpha:data1", "Mirroring")
    assert "intent log of no recorded job replaced" in beta.log_text()
