"""The administrator's mirror commands and async mode, with real daemons and real clients.

Commands go through the ``volkeeper`` CLI (and, for refusals, the API): pause / continue /
break / resync [--full] / delete, each checked by the state it leads to, by what the intent
log marks, by what reaches the target (sha256 of the backing files after both daemons stop)
and by what survives a restart.  Async mode is checked under an fio load with verify, and
against a target that stops answering (SIGSTOP): writes must not block, the queue must stay
under its limit, and the mirror must catch up by resync once the target is back.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import NodeFactory, need
from tests.support.metrics import (
    metric,
    metrics,
)
from tests.support.mirroring import (
    VERIFY,
    MiB,
    cli,
    data1,
    fio,
    mirror_view,
    ok,
    pair,
    random_file,
    stop_both_and_compare,
    wait_state,
)
from volkeeper_lab.launcher import LocalNode


def create_job(alpha: LocalNode, *options: str) -> None:
    done = cli("job", "create", "web", "--source", "alpha:data1", "--target", "beta:data1",
               "--yes", "--node", f"unix:{alpha.control_socket}", *options)  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_state(alpha, "Mirroring")


def mirror(alpha: LocalNode, *args: str) -> tuple[int, str, str]:
    done = cli("mirror", *args, "--node", f"unix:{alpha.control_socket}")
    return done.returncode, done.stdout, done.stderr


# -- pause / continue / restart / break / resync --full ------------------------------------------


def test_pause_continue_break_and_full_resync(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdcopy")
    alpha, beta = pair(start_node, "64MiB")
    create_job(alpha)
    before = data1(beta).read_bytes()[: 8 * MiB]

    code, out, err = mirror(alpha, "pause", "web")
    assert code == 0, err
    assert "Paused" in out
    assert mirror(alpha, "pause", "web")[0] == 0  # idempotent
    ok("nbdcopy", str(random_file(tmp_path / "a.bin", 4 * MiB)), alpha.uri())
    view = wait_state(alpha, "Paused")
    assert 4 * MiB <= view["out_of_sync_bytes"] <= 4 * MiB + 64 * 1024, view
    assert data1(beta).read_bytes()[: 8 * MiB] == before, "a paused mirror sent data"

    alpha.stop()  # the pause is remembered across a restart, and so are the marks
    alpha.start()
    view = wait_state(alpha, "Paused")
    assert view["out_of_sync_bytes"] >= 4 * MiB, view

    sent_before = view["sent_bytes"]
    code, _, err = mirror(alpha, "continue", "web")
    assert code == 0, err
    view = wait_state(alpha, "Mirroring")
    assert view["sent_bytes"] - sent_before <= 1.1 * 4 * MiB + 64 * 1024, view

    code, out, err = mirror(alpha, "break", "web")
    assert code == 0 and "Broken" in out, err
    view = mirror_view(alpha)
    assert view["state"] == "Broken" and view["out_of_sync_bytes"] == 64 * MiB, view
    for refused in (("continue", "web"), ("resync", "web"), ("pause", "web")):
        code, _, err = mirror(alpha, *refused)
        assert code != 0 and "Broken" in err and "--full" in err, (refused, err)
    ok("nbdcopy", str(random_file(tmp_path / "b.bin", 2 * MiB)), alpha.uri())
    alpha.stop()
    alpha.start()
    assert mirror_view(alpha)["state"] == "Broken"  # a restart does not repair it

    code, _, err = mirror(alpha, "resync", "web", "--target", "beta:other")
    assert code != 0 and "no mirror to beta:other" in err, err
    sent_before = mirror_view(alpha)["sent_bytes"]
    code, _, err = mirror(alpha, "resync", "web", "--full")
    assert code == 0, err
    view = wait_state(alpha, "Mirroring", timeout=60)
    assert view["sent_bytes"] - sent_before >= 64 * MiB, view  # every region went again
    stop_both_and_compare(alpha, beta)


def test_mirror_commands_refuse_bad_requests_and_delete_unlocks(start_node: NodeFactory) -> None:
    alpha, beta = pair(start_node, "16MiB")
    create_job(alpha)
    with alpha.api() as api:
        answer = api.post("/jobs/nope/mirror/pause")
        assert answer.status_code == 404 and "nope" in answer.json()["error"]["message"]
        answer = api.post("/jobs/web/mirror/explode")
        assert answer.status_code == 422, answer.text
        answer = api.post("/jobs/web/mirror/pause", json={"full": True})
        assert answer.status_code == 400 and "resync" in answer.json()["error"]["message"]
        answer = api.post("/jobs/web/mirror/pause", json={"target": 7})
        assert answer.status_code == 422, answer.text
    assert mirror_view(alpha)["state"] == "Mirroring"  # nothing above changed anything

    code, _, err = mirror(alpha, "delete", "web")
    assert code == 0, err
    assert alpha.status()["mirrors"] == []
    with beta.api() as api:
        volume = {v["name"]: v for v in api.get("/volumes").json()}["data1"]
    assert volume["role"] == "standalone" and not volume["locked"], volume


# -- async mode --------------------------------------------------------------------------------


def test_async_mirror_under_fio_load_is_identical(start_node: NodeFactory, tmp_path: Path) -> None:
    alpha, beta = pair(start_node, "64MiB")
    create_job(alpha, "--mode", "async", "--region-size", "64KiB")
    assert mirror_view(alpha)["mode"] == "async"
    assert mirror_view(alpha)["intent_log"]["region_bytes"] == 64 * 1024
    fio(alpha.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32m",
        "--io_size=48m", *VERIFY)  # fmt: skip
    fio(alpha.uri(), tmp_path, "--rw=write", "--bs=1m", "--iodepth=4", "--size=64m", *VERIFY)
    view = wait_state(alpha, "Mirroring")
    text = metrics(alpha)
    labels = {"job": "web", "target": "beta:data1"}
    assert metric(text, "volkeeper_mirror_state", state="Mirroring", **labels) == 1
    assert metric(text, "volkeeper_mirror_state", state="Paused", **labels) == 0
    assert metric(text, "volkeeper_mirror_sent_bytes_total", **labels) >= 64 * MiB
    assert metric(text, "volkeeper_mirror_ack_duration_seconds_count", **labels) > 1000
    assert metric(text, "volkeeper_mirror_outofsync_bytes", **labels) == 0
    received = metric(metrics(beta), "volkeeper_mirror_received_bytes_total", volume="data1")
    assert received >= 64 * MiB
    assert view["queue_limit_bytes"] == 64 * MiB
    stop_both_and_compare(alpha, beta)


def test_async_queue_full_tracks_instead_of_blocking(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    alpha, beta = pair(start_node, "64MiB")
    create_job(alpha, "--mode", "async", "--queue-limit", "2MiB")
    assert beta.process is not None
    os.kill(beta.process.pid, signal.SIGSTOP)  # the target stops answering, the link stays up
    try:
        started = time.monotonic()
        ok("nbdcopy", str(random_file(tmp_path / "a.bin", 48 * MiB)), alpha.uri(), timeout=30)
        elapsed = time.monotonic() - started
        view = mirror_view(alpha)
        text = metrics(alpha)
    finally:
        os.kill(beta.process.pid, signal.SIGCONT)
    # The target holds at most the queue limit plus socket buffers: the writes did not wait
    # for it (a sync mirror would have waited peer_timeout, 10 s, for the silent target).
    assert elapsed < 8, f"48 MiB took {elapsed:.1f} s with the target stopped"
    assert view["state"] in ("Resyncing", "Resync pending"), view
    assert view["queue_bytes"] <= 2 * MiB, view
    assert view["out_of_sync_bytes"] >= 40 * MiB, view
    labels = {"job": "web", "target": "beta:data1"}
    assert metric(text, "volkeeper_mirror_queue_overflows_total", **labels) > 0
    assert re.search(r"async queue full", alpha.log_text())
    wait_state(alpha, "Mirroring", timeout=60)
    stop_both_and_compare(alpha, beta)


@pytest.fixture(scope="module")
def idle_pair(start_module_node: NodeFactory) -> tuple[LocalNode, LocalNode]:
    """alpha and beta, no job: shared by the tests of refused requests."""
    return pair(start_module_node, "16MiB")


REGION_RULE = "region size must be a power of two from 4 KiB to 1 MiB"


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("queue_limit", "lots", "queue_limit"),
        ("queue_limit", 4096, "at least 1 MiB"),
        ("mode", "semi", "sync, async"),
        ("region_size", "3000", REGION_RULE),
        ("region_size", "2MiB", REGION_RULE),
        ("region_size", "1KiB", REGION_RULE),
    ],
)
def test_job_create_refuses_a_bad_setting(
    idle_pair: tuple[LocalNode, LocalNode], setting: str, value: object, words: str
) -> None:
    alpha, _ = idle_pair
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "async",
            "confirm": True, setting: value}  # fmt: skip
    with alpha.api() as api:
        answer: httpx.Response = api.post("/jobs", json=body)
    assert answer.status_code == 400 and words in answer.text, answer.text
    assert alpha.status()["mirrors"] == []
