"""Topologies of jobs with three real daemons: one-to-two, two on one node, many-to-one, several
volumes per job, a target added and removed under load, per-mirror commands and restarts.

Every test starts ``gamma``, then ``beta`` (gamma in its ``[peers]``), then ``alpha`` (beta and
gamma in its ``[peers]``) with the ``start_node`` fixture, creates jobs through the API or the
CLI, and drives the sources' NBD exports with fio (randwrite with crc32c verify) and nbdcopy.
Mirrors are told apart by (job, target): a job here may have several.  State changes are
watched with ``volkeeper events --json`` (a subprocess, synchronised on the end-of-initial-state
marker) where "no state change" matters.  Data is always checked on disk after the daemons
stopped: sources first, so targets receive everything before they go; then the backing files
must be byte-identical (sha256).

Byte counts come from the source's mirror view: ``out_of_sync_bytes`` is what the intent log
marks, ``sent_bytes`` counts payload shipped since the daemon started.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    VERIFY,
    MiB,
    fio,
    fio_result,
    ok,
    random_file,
    sha256,
    start_fio,
    stop_process,
)
from tests.support.topologies import (
    Events,
    Load,
    assert_identical,
    mirror,
    mirrors,
    path,
    post,
    stop_in_order,
    trio,
    vk_ok,
    volume,
    wait_mirror,
)
from volkeeper_lab.launcher import LocalNode

VOLUME_BYTES = 32 * MiB
SLACK = 64 * 1024  # a resync sends whole regions; allow a little beyond what was written

# -- helpers ---------------------------------------------------------------------------------


def jobs(node: LocalNode) -> dict[str, dict[str, Any]]:
    with node.api() as api:
        answer = api.get("/jobs")
    assert answer.status_code == 200, answer.text
    return {job["name"]: job for job in answer.json()}


def fio_load(node: LocalNode, cwd: Path, volume: str = "data1", io_size: str = "16m") -> None:
    """Random 4 KiB writes over the whole volume, then fio reads everything back and checks."""
    cwd.mkdir(parents=True, exist_ok=True)
    result = fio(node.uri(volume), cwd, "--rw=randwrite", "--bs=4k", "--iodepth=16",
                 "--size=32m", f"--io_size={io_size}", *VERIFY)  # fmt: skip
    assert result["read"]["io_bytes"] == result["write"]["io_bytes"] > 0, result


def copy_in(node: LocalNode, tmp: Path, size: int, volume: str = "data1") -> bytes:
    """nbdcopy a random file to the start of the volume; returns what was written."""
    need("nbdcopy")
    payload = random_file(tmp / f"payload-{time.monotonic_ns()}.bin", size)
    ok("nbdcopy", str(payload), node.uri(volume))
    return payload.read_bytes()


def region(file: Path, offset: int, length: int) -> bytes:
    with file.open("rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def background() -> Iterator[list[Load | Events]]:
    """Loads and event watchers of a test, stopped by PID before the nodes are."""
    started: list[Load | Events] = []
    yield started
    for item in started:
        if isinstance(item, Load):
            item.abort()
        else:
            item.stop()


def load(background: list[Load | Events], *args: Any, **kw: Any) -> Load:
    started = Load(*args, **kw)
    background.append(started)
    started.start()
    return started


def watch(background: list[Load | Events], node: LocalNode, output: Path) -> Events:
    watcher = Events(node, output)
    background.append(watcher)
    return watcher


# -- 1. one source, two targets on two nodes, one job ---------------------------------------------


def test_one_source_to_two_nodes_sync_and_async(start_node: NodeFactory, tmp_path: Path) -> None:
    alpha, beta, gamma = trio(start_node)
    body = {
        "name": "web",
        "description": "front end, two copies",
        "mirrors": [
            {"source": "alpha:data1", "target": "beta:data1", "mode": "sync"},
            {"source": "alpha:data1", "target": "gamma:data1", "mode": "async"},
        ],
        "confirm": True,
    }
    created = post(alpha, body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["name"], job["role"], job["description"]) == ("web", "source", body["description"])
    assert {(m["target"], m["mode"]) for m in job["mirrors"]} == {
        ("beta:data1", "sync"),
        ("gamma:data1", "async"),
    }, job
    for target in ("beta:data1", "gamma:data1"):
        wait_mirror(alpha, "web", target, "Mirroring", timeout=60)

    fio_load(alpha, tmp_path / "fio")
    copy_in(alpha, tmp_path, 4 * MiB)
    for target in ("beta:data1", "gamma:data1"):
        view = wait_mirror(alpha, "web", target, "Mirroring")
        assert view["sent_bytes"] >= VOLUME_BYTES + 16 * MiB + 4 * MiB, view
    deadline = time.monotonic() + 10  # async: the queue drains, nothing stays marked
    while (view := mirror(alpha, "web", "gamma:data1"))["out_of_sync_bytes"] or view["queue_bytes"]:
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert mirror(alpha, "web", "beta:data1")["out_of_sync_bytes"] == 0

    # The targets answer for the job, and show their side of the mirror.
    for node, mode in ((beta, "sync"), (gamma, "async")):
        listed = jobs(node)
        assert list(listed) == ["web"], listed
        served = listed["web"]
        assert (served["role"], served["description"], served["source_node"]) == (
            "target", body["description"], "alpha",
        ), served  # fmt: skip
        target = f"{node.name}:data1"
        assert target in [m["target"] for m in served["mirrors"]], served
        view = mirror(node, "web", target)
        assert (view["role"], view["source"], view["state"], view["mode"]) == (
            "target", "alpha:data1", "Mirroring", mode,
        ), view  # fmt: skip
        # an async copy keeps write order and may lack the last writes: Consistent
        assert view["data_state"] == ("Consistent" if mode == "async" else "UpToDate"), view
        assert view["received_bytes"] >= 16 * MiB, view
        assert volume(node)["role"] == "target" and volume(node)["locked"], volume(node)

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta), path(gamma))


# -- 2. one source, two targets on one node ------------------------------------------------------


def test_one_source_to_two_volumes_of_one_node_through_the_cli(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta, gamma = trio(start_node, beta=("data1", "data2"))
    out = vk_ok(alpha, "job", "create", "web", "--source", "alpha:data1",
                "--target", "beta:data1", "--target", "beta:data2", "--yes")  # fmt: skip
    assert "beta:data1" in out and "beta:data2" in out, out
    listed = json.loads(vk_ok(alpha, "job", "list", "--json"))
    assert [(j["name"], sorted(m["target"] for m in j["mirrors"])) for j in listed] == [
        ("web", ["beta:data1", "beta:data2"])
    ], listed
    for target in ("beta:data1", "beta:data2"):
        wait_mirror(alpha, "web", target, "Mirroring", timeout=60)

    fio_load(alpha, tmp_path / "fio")
    copy_in(alpha, tmp_path, 4 * MiB)
    for target in ("beta:data1", "beta:data2"):
        view = wait_mirror(alpha, "web", target, "Mirroring")
        assert view["out_of_sync_bytes"] == 0, view
        assert mirror(beta, "web", target)["state"] == "Mirroring"
    for name in ("data1", "data2"):
        assert volume(beta, name)["role"] == "target", volume(beta, name)
    assert list(jobs(beta)) == ["web"] and jobs(beta)["web"]["role"] == "target"

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta, "data1"), path(beta, "data2"))


# -- 3. many to one --------------------------------------------------------------------------------


def test_two_sources_to_one_target_node_and_a_third_claim_is_refused(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta, gamma = trio(start_node, beta=("data1", "data2"), gamma=("a", "b"))
    for node, name, source, target in (
        (alpha, "x", "alpha:data1", "gamma:a"),
        (beta, "y", "beta:data1", "gamma:b"),
    ):
        body = {"name": name, "source": source, "target": target, "confirm": True}
        created = post(node, body)
        assert created.status_code == 201, created.text
    wait_mirror(alpha, "x", "gamma:a", "Mirroring", timeout=60)
    wait_mirror(beta, "y", "gamma:b", "Mirroring", timeout=60)

    runs = []
    for node in (alpha, beta):  # concurrently
        cwd = tmp_path / f"fio-{node.name}"
        cwd.mkdir()
        runs.append(start_fio(node.uri(), cwd, "--rw=randwrite", "--bs=4k", "--iodepth=16",
                              "--size=32m", "--io_size=12m", *VERIFY))  # fmt: skip
    try:
        for process, output in runs:
            assert process.wait(120) == 0, output.parent.joinpath("fio.stderr").read_text()
            result = fio_result(output)
            assert result["error"] == 0 and result["read"]["io_bytes"] == 12 * MiB, result
    finally:
        for process, _ in runs:
            stop_process(process)

    assert wait_mirror(alpha, "x", "gamma:a", "Mirroring")["out_of_sync_bytes"] == 0
    assert wait_mirror(beta, "y", "gamma:b", "Mirroring")["out_of_sync_bytes"] == 0
    seen = {key: (m["role"], m["source"], m["state"]) for key, m in mirrors(gamma).items()}
    assert seen == {
        ("x", "gamma:a"): ("target", "alpha:data1", "Mirroring"),
        ("y", "gamma:b"): ("target", "beta:data1", "Mirroring"),
    }, seen
    assert {name: job["role"] for name, job in jobs(gamma).items()} == {
        "x": "target", "y": "target"
    }  # fmt: skip
    for name, job in (("a", "x"), ("b", "y")):
        view = volume(gamma, name)
        assert view["role"] == "target" and f"'{job}'" in (view["locked"] or ""), view

    # gamma:a is alpha's: another job of beta may not claim it, and nothing is left behind.
    third = post(beta, {"name": "z", "source": "beta:data2", "target": "gamma:a", "confirm": True})
    assert third.status_code == 409, third.text
    message = third.json()["error"]["message"]
    assert "job 'x' from alpha:data1" in message, message
    assert list(jobs(beta)) == ["y"], jobs(beta)
    assert volume(beta, "data2")["role"] == "standalone"
    assert not list((beta.directory / "state" / "bitmaps").glob("z@*"))
    assert mirror(gamma, "x", "gamma:a")["source"] == "alpha:data1"
    assert mirror(alpha, "x", "gamma:a")["state"] == "Mirroring"

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(gamma, "a"))
    assert_identical(path(beta), path(gamma, "b"))


# -- 4. several volumes in one job --------------------------------------------------------------


def test_job_of_two_volumes_pauses_and_continues_as_one(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta, gamma = trio(start_node, alpha=("data1", "data2"), beta=("data1", "data2"))
    pairs = (("alpha:data1", "beta:data1"), ("alpha:data2", "beta:data2"))
    body = {
        "name": "app",
        "mirrors": [{"source": s, "target": t} for s, t in pairs],
        "confirm": True,
    }
    created = post(alpha, body)
    assert created.status_code == 201, created.text
    for _, target in pairs:
        wait_mirror(alpha, "app", target, "Mirroring", timeout=60)

    out = vk_ok(alpha, "mirror", "pause", "app")
    assert out.count("Paused") == 2, out
    written = {"data1": 3 * MiB, "data2": 5 * MiB}
    for name, size in written.items():
        copy_in(alpha, tmp_path, size, name)
    sent = {}
    for name, size in written.items():
        view = wait_mirror(alpha, "app", f"beta:{name}", "Paused")
        assert size <= view["out_of_sync_bytes"] <= size + SLACK, view
        sent[name] = view["sent_bytes"]
        assert mirror(beta, "app", f"beta:{name}")["state"] == "Paused"

    out = vk_ok(alpha, "mirror", "continue", "app")
    for name, size in written.items():
        view = wait_mirror(alpha, "app", f"beta:{name}", "Mirroring")
        delta = view["sent_bytes"] - sent[name]
        assert size <= delta <= 1.1 * size + SLACK, f"{name}: wrote {size}, resync sent {delta}"
        assert view["out_of_sync_bytes"] == 0, view

    fio_load(alpha, tmp_path / "fio1", "data1", io_size="4m")
    fio_load(alpha, tmp_path / "fio2", "data2", io_size="4m")
    stop_in_order(alpha, beta, gamma)
    for name in ("data1", "data2"):
        assert_identical(path(alpha, name), path(beta, name))


# -- 5. a target added and removed under load -------------------------------------------------


def test_add_and_delete_a_target_under_load_leaves_the_other_mirror_alone(
    start_node: NodeFactory, tmp_path: Path, background: list[Load | Events]
) -> None:
    alpha, beta, gamma = trio(start_node)
    payload = copy_in(alpha, tmp_path, 4 * MiB)  # fio below never writes there
    vk_ok(alpha, "job", "create", "web", "--source", "alpha:data1", "--target", "beta:data1",
          "--yes")  # fmt: skip
    wait_mirror(alpha, "web", "beta:data1", "Mirroring", timeout=60)

    events = watch(background, alpha, tmp_path / "events.jsonl")
    writes = load(background, alpha.uri(), tmp_path / "load", 8 * MiB, 16 * MiB)
    writes.wait_running()

    vk_ok(alpha, "job", "add-target", "web", "--target", "gamma:data1", "--yes")
    view = wait_mirror(alpha, "web", "gamma:data1", "Mirroring", timeout=90)
    assert view["sent_bytes"] >= VOLUME_BYTES, f"no full resync of the new target: {view}"
    assert mirror(alpha, "web", "beta:data1")["state"] == "Mirroring"
    assert mirror(gamma, "web", "gamma:data1")["role"] == "target"
    writes.wait_running(writes.runs + 1)  # the load goes on with both mirrors

    with alpha.api() as api:
        answer = api.delete("/jobs/web/mirror", params={"target": "gamma:data1"})
    assert answer.status_code == 200, answer.text
    assert [m["target"] for m in answer.json()["mirrors"]] == ["beta:data1"], answer.json()

    deadline = time.monotonic() + 5
    while (released := volume(gamma))["role"] != "standalone":
        assert time.monotonic() < deadline, f"gamma:data1 still {released}"
        time.sleep(0.05)
    assert released["locked"] is None, released
    assert mirrors(gamma) == {} and jobs(gamma) == {}, gamma.status()
    assert not (alpha.directory / "state" / "bitmaps" / "web@gamma:data1.vkil").exists()
    kept = sha256(path(gamma))
    writes.wait_running(writes.runs + 1)  # more writes: none of them reaches gamma now
    assert sha256(path(gamma)) == kept, "gamma:data1 changed after its mirror was deleted"
    assert region(path(gamma), 0, 4 * MiB) == payload, "gamma:data1 lost its data"
    writes.finish()
    events.stop()

    assert events.states("beta:data1") == [], f"the old mirror changed state: {events.live()}"
    objects = [(e["type"], e["object"], e.get("target")) for e in events.live()]
    assert ("create", "mirror", "gamma:data1") in objects, objects
    assert ("destroy", "mirror", "gamma:data1") in objects, objects
    view = wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    assert view["out_of_sync_bytes"] == 0, view
    assert list(mirrors(alpha)) == [("web", "beta:data1")]

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta))
    assert region(path(gamma), 0, 4 * MiB) == payload

    # The added mirror: a full resync to Mirroring, then deleted -- not "lost": a deletion
    # that the target was told of is no "Resync pending" (cause "target lost") before
    # its destroy event.
    added = events.states("gamma:data1")
    seen = [
        f"{e['type']} {e.get('was', '')}->{e.get('state', '')} ({e.get('cause', '')})"
        for e in events.live()
        if e.get("target") == "gamma:data1"
    ]
    assert added == ["Resyncing", "Mirroring"], f"events of the added mirror: {seen}"


# -- 6. per-mirror commands -------------------------------------------------------------------


def test_pause_one_target_of_two_and_change_its_mode_under_load(
    start_node: NodeFactory, tmp_path: Path, background: list[Load | Events]
) -> None:
    alpha, beta, gamma = trio(start_node)
    created = post(alpha, {"name": "web", "source": "alpha:data1",
                           "target": ["beta:data1", "gamma:data1"], "confirm": True})  # fmt: skip
    assert created.status_code == 201, created.text
    for target in ("beta:data1", "gamma:data1"):
        wait_mirror(alpha, "web", target, "Mirroring", timeout=60)

    events = watch(background, alpha, tmp_path / "pause.jsonl")
    out = vk_ok(alpha, "mirror", "pause", "web", "--target", "gamma:data1")
    assert "gamma:data1 Paused" in out and "beta:data1" not in out, out
    assert mirror(alpha, "web", "beta:data1")["state"] == "Mirroring"
    before = region(path(gamma), 0, 4 * MiB)
    payload = copy_in(alpha, tmp_path, 4 * MiB)
    assert region(path(beta), 0, 4 * MiB) == payload, "the running mirror missed the writes"
    assert region(path(gamma), 0, 4 * MiB) == before, "the paused mirror sent data"
    paused = wait_mirror(alpha, "web", "gamma:data1", "Paused")
    assert 4 * MiB <= paused["out_of_sync_bytes"] <= 4 * MiB + SLACK, paused
    assert mirror(alpha, "web", "beta:data1")["out_of_sync_bytes"] == 0
    assert mirror(gamma, "web", "gamma:data1")["state"] == "Paused"

    vk_ok(alpha, "mirror", "continue", "web", "--target", "gamma:data1")
    back = wait_mirror(alpha, "web", "gamma:data1", "Mirroring")
    delta = back["sent_bytes"] - paused["sent_bytes"]
    marked = paused["out_of_sync_bytes"]
    assert marked <= delta <= 1.1 * marked + SLACK, f"marked {marked}, the resync sent {delta}"
    events.stop()
    assert events.states("beta:data1") == [], events.live()
    assert events.states("gamma:data1")[0] == "Paused", events.live()

    # The mode of one mirror, live and under load: no reconnection, no state change.
    events = watch(background, alpha, tmp_path / "mode.jsonl")
    writes = load(background, alpha.uri(), tmp_path / "load", 8 * MiB, 24 * MiB)
    writes.wait_running()
    out = vk_ok(alpha, "mirror", "set", "web", "--target", "gamma:data1", "--mode", "async")
    assert "gamma:data1 mode async" in out, out
    assert mirror(alpha, "web", "gamma:data1")["mode"] == "async"
    assert mirror(alpha, "web", "beta:data1")["mode"] == "sync"
    writes.wait_running(writes.runs + 1)
    vk_ok(alpha, "mirror", "set", "web", "--target", "gamma:data1", "--mode", "sync")
    writes.wait_running(writes.runs + 1)
    writes.finish()
    events.stop()
    assert events.states("beta:data1") == [] and events.states("gamma:data1") == [], events.live()
    modes = [e["mode"] for e in events.live() if e.get("target") == "gamma:data1" and "mode" in e]
    assert modes == ["async", "sync"], events.live()
    for target in ("beta:data1", "gamma:data1"):
        view = mirror(alpha, "web", target)
        assert (view["state"], view["mode"], view["out_of_sync_bytes"]) == (
            "Mirroring", "sync", 0
        ), view  # fmt: skip

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta), path(gamma))


# -- 7. restarts -------------------------------------------------------------------------------


def _shape(job: dict[str, Any]) -> tuple[Any, ...]:
    return (
        job["name"], job["description"], job["source_node"], job["role"], job["declared"],
        sorted((m["source"], m["target"], m["mode"], m["compression"], m["throttle"])
               for m in job["mirrors"]),
    )  # fmt: skip


def test_restart_each_of_three_nodes_keeps_jobs_and_resends_little(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta, gamma = trio(start_node)
    body = {
        "name": "web",
        "description": "survives restarts",
        "mirrors": [
            {"source": "alpha:data1", "target": "beta:data1", "mode": "sync"},
            {"source": "alpha:data1", "target": "gamma:data1", "mode": "async"},
        ],
        "confirm": True,
    }
    assert post(alpha, body).status_code == 201
    targets = ("beta:data1", "gamma:data1")
    for target in targets:
        wait_mirror(alpha, "web", target, "Mirroring", timeout=60)
    fio_load(alpha, tmp_path / "fio0", io_size="4m")
    for target in targets:
        wait_mirror(alpha, "web", target, "Mirroring")
    shape = _shape(jobs(alpha)["web"])

    # The source: a clean stop resends (almost) nothing.
    time.sleep(1.0)
    alpha.stop()
    alpha.start()
    assert _shape(jobs(alpha)["web"]) == shape
    for target in targets:
        view = wait_mirror(alpha, "web", target, "Mirroring")
        assert view["sent_bytes"] <= 256 * 1024, f"restart resent {view['sent_bytes']} bytes"
        assert view["out_of_sync_bytes"] == 0, view

    # Each target: writes made while it is away are resent, and only those.
    for step, (node, other) in enumerate(((beta, gamma), (gamma, beta)), 1):
        target, other_target = f"{node.name}:data1", f"{other.name}:data1"
        node.stop()
        wait_mirror(alpha, "web", target, "Resync pending", timeout=10)
        fio(alpha.uri(), tmp_path, "--rw=write", "--bs=64k", f"--offset={4 * step}m",
            "--size=2m")  # fmt: skip
        away = mirror(alpha, "web", target)
        assert 2 * MiB <= away["out_of_sync_bytes"] <= 2 * MiB + SLACK, away
        node.start()
        served = jobs(node)
        assert (list(served), served["web"]["role"]) == (["web"], "target"), served
        assert served["web"]["description"] == body["description"], served
        assert volume(node)["role"] == "target", volume(node)
        back = wait_mirror(alpha, "web", target, "Mirroring")
        delta = back["sent_bytes"] - away["sent_bytes"]
        marked = away["out_of_sync_bytes"]
        assert marked <= delta <= 1.1 * marked + SLACK, f"marked {marked}, resync sent {delta}"
        assert wait_mirror(node, "web", target, "Mirroring")["role"] == "target"
        assert mirror(alpha, "web", other_target)["state"] == "Mirroring"
        assert _shape(jobs(alpha)["web"]) == shape

    stop_in_order(alpha, beta, gamma)
    assert_identical(path(alpha), path(beta), path(gamma))
