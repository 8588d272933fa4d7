"""Mirrors end to end: two real daemons on loopback, real NBD clients, sha256 of backing files.

Every test starts a target node ``beta`` and a source node ``alpha`` (whose ``[peers]`` names
beta's replication port) with the ``start_node`` fixture, creates job ``web`` (alpha:data1 ->
beta:data1, sync mode) and drives alpha's NBD export with nbdcopy, fio or libnbd while the
mirror runs.  Where a test kills a daemon with ``kill -9`` it restarts it, so every daemon is
still stopped by PID at teardown and must exit 0 there.  Data is always checked on disk, on
both sides, after both daemons have stopped: the backing files must be byte-identical.

Byte counts come from the source's ``GET /status`` mirror view: ``out_of_sync_bytes`` is what
the intent log marks, ``sent_bytes`` counts write and resync payload bytes shipped since the
daemon started, so its growth across a reconnection is what the resync sent.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    EXTENT,
    VERIFY,
    MiB,
    StateLog,
    cli,
    data1,
    fio,
    fio_result,
    libnbd,
    mirror_view,
    mirrored_pair,
    ok,
    pair,
    post_job,
    random_file,
    run,
    sha256,
    start_fio,
    stop_both_and_compare,
    stop_process,
    volume_view,
    wait_state,
)
from volkeeper_lab.launcher import VolumeSpec


@pytest.fixture
def state_log() -> Iterator[list[StateLog]]:
    watchers: list[StateLog] = []
    yield watchers
    for watcher in watchers:
        watcher.finish()


# -- 1. job creation ---------------------------------------------------------------------------


def test_job_needs_confirmation_then_full_resync_locks_the_target(
    start_node: NodeFactory, tmp_path: Path, state_log: list[StateLog]
) -> None:
    need("nbdcopy")
    alpha, beta = pair(start_node, "128MiB")
    payload = random_file(tmp_path / "payload.bin", 16 * MiB)
    ok("nbdcopy", str(payload), alpha.uri())
    ok("nbdcopy", str(random_file(tmp_path / "junk.bin", 16 * MiB)), beta.uri())  # to overwrite

    # Without confirm: 412, and nothing starts.
    refused = post_job(alpha, confirm=False)
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"]["code"] == "confirmation_required"
    assert "beta:data1" in refused.json()["error"]["message"]
    time.sleep(0.5)  # a mirror started by mistake would have claimed beta:data1 by now
    bitmaps = alpha.directory / "state" / "bitmaps"
    assert not bitmaps.exists() or not list(bitmaps.glob("*.vkil"))
    assert not list((alpha.directory / "state").glob("jobs/*.json"))
    assert alpha.status()["mirrors"] == []
    assert volume_view(alpha)["role"] == "standalone"
    target = volume_view(beta)
    assert (target["role"], target["locked"]) == ("standalone", None), target

    # With --yes through the CLI: Resyncing, then Mirroring.
    watcher = StateLog(alpha)
    state_log.append(watcher)
    watcher.start()
    created = cli(
        "job", "create", "web", "--source", "alpha:data1", "--target", "beta:data1", "--yes",
        "--node", f"unix:{alpha.control_socket}",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "web" in created.stdout
    view = wait_state(alpha, "Mirroring", timeout=60)
    states = watcher.finish()
    assert "Resyncing" in states and states[-1] == "Mirroring", states
    assert states.index("Resyncing") < states.index("Mirroring"), states
    assert view["out_of_sync_bytes"] == 0
    assert view["sent_bytes"] >= 128 * MiB, view  # a full resync
    assert list(bitmaps.glob("*.vkil")) == [bitmaps / "web@beta:data1.vkil"]

    listed = cli("job", "list", "--json", "--node", f"unix:{alpha.control_socket}")
    assert listed.returncode == 0, listed.stderr
    (job,) = json.loads(listed.stdout)
    assert (job["name"], job["role"], job["source_node"]) == ("web", "source", "alpha")
    (mirror,) = job["mirrors"]
    assert (mirror["source"], mirror["target"], mirror["mode"], mirror["state"]) == (
        "alpha:data1", "beta:data1", "sync", "Mirroring",
    )  # fmt: skip

    assert volume_view(alpha)["role"] == "source"
    target = volume_view(beta)
    assert target["role"] == "target", target
    assert target["locked"] and "web" in target["locked"], target

    # The target's export refuses writes, serves reads.
    attempt = run("nbdcopy", str(random_file(tmp_path / "other.bin", 4 * MiB)), beta.uri())
    assert attempt.returncode != 0, "nbdcopy wrote to a locked mirror target"
    back = tmp_path / "back.bin"
    ok("nbdcopy", beta.uri(), str(back))
    assert back.stat().st_size == 128 * MiB
    assert sha256(back) == sha256(data1(alpha))

    digest = stop_both_and_compare(alpha, beta)
    with data1(beta).open("rb") as f:
        assert f.read(16 * MiB) == payload.read_bytes()
        assert f.read(16 * MiB) == bytes(16 * MiB)  # the junk beyond is gone too
    assert digest == sha256(data1(alpha))


# -- 2. sync mirroring under load ----------------------------------------------------------------

WRITE_ORDER = r"""
import random, struct, sys
import nbd

uri, model_path = sys.argv[1], sys.argv[4]
sequential, concurrent = int(sys.argv[2]), int(sys.argv[3])
REGION, WRITES, DEPTH, ROUNDS, PER_ROUND = 65536, 2000, 64, 256, 16
rng = random.Random(20240501)

def next_write(i, largest):
    offset = rng.randrange(0, REGION // 512) * 512
    length = rng.randrange(1, min(largest, (REGION - offset) // 512) + 1) * 512
    return offset, struct.pack("<II", i + 1, offset) * (length // 8)

h = nbd.NBD()
h.connect_uri(uri)

# 1: one region, one write at a time: the final content is known.
model = bytearray(h.pread(REGION, sequential))
for i in range(WRITES):
    offset, data = next_write(i, 32)
    h.pwrite(data, sequential + offset)
    model[offset:offset + len(data)] = data
h.flush()
assert h.pread(REGION, sequential) == model, "source does not read back its own writes"
open(model_path, "wb").write(model)

# 2: ROUNDS regions, PER_ROUND overlapping writes each, DEPTH in flight: whatever order the
# source applies them in, the target must apply the same.
cookies = []
for i in range(ROUNDS * PER_ROUND):
    offset, data = next_write(i, 128)
    while h.aio_in_flight() >= DEPTH:
        h.poll(-1)
    buffer = nbd.Buffer.from_bytearray(bytearray(data))
    where = concurrent + (i // PER_ROUND) * REGION + offset
    cookies.append((h.aio_pwrite(buffer, where), buffer))
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie, _ in cookies:
    assert h.aio_command_completed(cookie)
h.flush()
h.shutdown()
"""


def test_sync_mirroring_under_fio_load_and_overlapping_writes(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = mirrored_pair(start_node, "64MiB")
    sent_before = mirror_view(alpha)["sent_bytes"]

    started = time.monotonic()
    result = fio(
        alpha.uri(), tmp_path,
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M", "--io_size=40M", *VERIFY,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result["write"]["io_bytes"] == 40 * MiB, result["write"]
    assert result["read"]["io_bytes"] == 40 * MiB, "fio's verify pass did not read everything"
    view = mirror_view(alpha)
    assert view["state"] == "Mirroring", view
    assert view["out_of_sync_bytes"] == 0, view
    assert view["sent_bytes"] - sent_before >= 40 * MiB, (view, elapsed)

    sequential, concurrent = 40 * MiB, 48 * MiB  # concurrent: 256 regions of 64 KiB
    model = tmp_path / "model.bin"
    done = libnbd(WRITE_ORDER, alpha.uri(), str(sequential), str(concurrent), str(model))
    assert done.returncode == 0, done.stderr
    assert mirror_view(alpha)["state"] == "Mirroring"

    stop_both_and_compare(alpha, beta)
    expected = model.read_bytes()
    for node in (alpha, beta):
        with data1(node).open("rb") as f:
            f.seek(sequential)
            assert f.read(len(expected)) == expected, f"{node.name}: sequential writes differ"


# -- 3. target away: partial resync ----------------------------------------------------------


def test_target_stopped_writes_go_on_and_partial_resync_sends_only_marked_bytes(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = mirrored_pair(start_node, "64MiB")
    assert beta.stop() == 0
    wait_state(alpha, "Resync pending", timeout=5)
    away = mirror_view(alpha)

    started = time.monotonic()
    fio(
        alpha.uri(), tmp_path,
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M", "--io_size=4M", *VERIFY,
        timeout=60,
    )  # fmt: skip
    assert time.monotonic() - started < 30, "writes were held up while the target was away"

    marked_view = mirror_view(alpha)
    assert marked_view["state"] == "Resync pending", marked_view
    marked, sent = marked_view["out_of_sync_bytes"], marked_view["sent_bytes"]
    assert sent == away["sent_bytes"], "bytes were counted as sent while the target was away"
    assert 4 * MiB <= marked < 8 * MiB, f"4 MiB of 4k writes marked {marked} bytes"

    beta.start()
    back = wait_state(alpha, "Mirroring", timeout=30)
    delta = back["sent_bytes"] - sent
    assert back["out_of_sync_bytes"] == 0, back
    assert marked <= delta <= 1.1 * marked, f"marked {marked}, the resync sent {delta}"
    assert delta < 64 * MiB // 4
    stop_both_and_compare(alpha, beta)


# -- 4. kill -9 of the target under load ---------------------------------------------------------


def test_kill_target_under_fio_load_then_partial_resync(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = mirrored_pair(start_node, "128MiB")
    sent_before = mirror_view(alpha)["sent_bytes"]
    fio_range = 32 * MiB
    process, output = start_fio(
        alpha.uri(), tmp_path,
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=0", f"--size={fio_range}",
        "--rate_iops=2000", *VERIFY,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while mirror_view(alpha)["sent_bytes"] - sent_before < 256 * 1024:
            assert time.monotonic() < deadline, "fio's writes never reached the mirror"
            assert process.poll() is None, (tmp_path / "fio.stderr").read_text()
            time.sleep(0.02)
        time.sleep(random.uniform(0.2, 1.0))
        beta.kill()
        wait_state(alpha, "Resync pending", timeout=5)
        assert process.poll() is None, "fio ended before the target was gone: test too short"
        written = volume_view(alpha)["written_bytes"]
        time.sleep(0.5)
        assert volume_view(alpha)["written_bytes"] > written, "writes stopped with the target"
        assert process.wait(60) == 0, (tmp_path / "fio.stderr").read_text()
    finally:
        stop_process(process)
    result = fio_result(output)
    assert result["error"] == 0 and result["write"]["io_bytes"] == fio_range, result["write"]
    assert result["read"]["io_bytes"] == fio_range, "fio's verify pass did not read everything"

    away = mirror_view(alpha)
    marked, sent = away["out_of_sync_bytes"], away["sent_bytes"]
    assert 0 < marked <= fio_range, away
    beta.start()
    assert volume_view(beta)["role"] == "target", "the lock did not survive kill -9"
    back = wait_state(alpha, "Mirroring", timeout=30)
    delta = back["sent_bytes"] - sent
    assert marked <= delta <= 1.1 * marked, f"marked {marked}, the resync sent {delta}"
    assert delta < 128 * MiB // 2, "a full resync after the target's kill -9"
    stop_both_and_compare(alpha, beta)


# -- 5. kill -9 of the source under load -------------------------------------------------------


def test_kill_source_under_fio_load_recovers_the_intent_log(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    alpha, beta = pair(start_node, "128MiB")
    ok("nbdcopy", str(random_file(tmp_path / "payload.bin", 16 * MiB)), alpha.uri())
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    sent_before = mirror_view(alpha)["sent_bytes"]
    fio_range = 8 * MiB
    process, _ = start_fio(
        alpha.uri(), tmp_path,
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=0", f"--size={fio_range}",
        "--io_size=64M", "--rate_iops=1500",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while mirror_view(alpha)["sent_bytes"] - sent_before < 256 * 1024:
            assert time.monotonic() < deadline, "fio's writes never reached the mirror"
            assert process.poll() is None, (tmp_path / "fio.stderr").read_text()
            time.sleep(0.02)
        time.sleep(random.uniform(0.2, 1.0))
        assert process.poll() is None, "fio ended before the kill: test too short"
        alpha.kill()
    finally:
        # fio's nbd engine does not exit when its server dies (it loops on "nbd_poll: nothing
        # to poll for in state DEAD"): stop it by PID.
        stop_process(process, grace=1)

    alpha.start()  # same config, no job create
    with alpha.api() as api:
        jobs = api.get("/jobs").json()
    assert [(j["name"], m["source"], m["target"]) for j in jobs for m in j["mirrors"]] == [
        ("web", "alpha:data1", "beta:data1")
    ], jobs
    back = wait_state(alpha, "Mirroring", timeout=30)
    resent = back["sent_bytes"]  # a fresh daemon: every byte counted was sent by the resync
    bound = -(-fio_range // EXTENT) * EXTENT + MiB
    assert 0 < resent <= bound, f"after the crash the resync sent {resent} (bound {bound})"
    assert back["out_of_sync_bytes"] == 0
    stop_both_and_compare(alpha, beta)


# -- 6. refusals -----------------------------------------------------------------------------


def test_refusals_small_target_second_job_unknown_peer_foreign_source(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    alpha, beta = pair(
        start_node,
        beta_volumes=[VolumeSpec("data1", "64MiB"), VolumeSpec("small", "32MiB")],
        alpha_volumes=[VolumeSpec("data1", "64MiB"), VolumeSpec("data2", "64MiB")],
    )
    small = beta.volume_path(beta.volumes[1])
    before = sha256(small)

    # The target is prepared before anything is created: refused, nothing is left behind.
    created = post_job(alpha, "web", target="beta:small")
    assert created.status_code == 400, created.text
    assert "smaller" in created.json()["error"]["message"], created.json()
    assert alpha.status()["mirrors"] == [] and alpha.status()["jobs"] == []
    assert not list((alpha.directory / "state" / "bitmaps").glob("*.vkil"))
    assert not list((alpha.directory / "state" / "jobs").glob("*.json"))
    assert volume_view(beta, "small")["role"] == "standalone"
    assert volume_view(beta, "small")["locked"] is None
    assert sha256(small) == before

    assert post_job(alpha, "web").status_code == 201
    second = post_job(alpha, "db", source="alpha:data1", target="beta:small")
    assert second.status_code == 409, second.text
    assert "'web'" in second.json()["error"]["message"], second.json()
    taken = post_job(alpha, "db", source="alpha:data2", target="beta:data1")
    assert taken.status_code == 409, taken.text
    assert "already a target of job 'web'" in taken.json()["error"]["message"], taken.json()

    unknown = post_job(alpha, "other", source="alpha:data2", target="gamma:data1")
    assert unknown.status_code == 404, unknown.text
    assert "[peers]" in unknown.json()["error"]["message"], unknown.json()

    foreign = post_job(alpha, "foreign", source="beta:data1", target="beta:small")
    assert foreign.status_code == 400, foreign.text
    assert foreign.json()["error"]["code"] == "bad_request"

    with alpha.api() as api:
        assert [j["name"] for j in api.get("/jobs").json()] == ["web"]
    assert volume_view(beta)["role"] == "target"
    bitmaps = alpha.directory / "state" / "bitmaps"
    assert sorted(p.name for p in bitmaps.glob("*.vkil")) == ["web@beta:data1.vkil"]


# -- 7. both nodes restart ---------------------------------------------------------------------


@pytest.mark.parametrize("first", ["alpha", "beta"])
def test_restart_of_both_nodes_resends_almost_nothing(
    start_node: NodeFactory, tmp_path: Path, first: str
) -> None:
    alpha, beta = mirrored_pair(start_node, "64MiB")
    fio(alpha.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M",
        "--io_size=4M")  # fmt: skip
    time.sleep(2.5)  # a clean stop (final sync, or the target's GOODBYE) loses nothing
    order = (alpha, beta) if first == "alpha" else (beta, alpha)
    codes = [node.stop() for node in order]
    assert codes == [0, 0]
    digest = sha256(data1(alpha))
    assert sha256(data1(beta)) == digest

    beta.start()
    alpha.start()
    with alpha.api() as api:
        assert [j["name"] for j in api.get("/jobs").json()] == ["web"]
    back = wait_state(alpha, "Mirroring", timeout=30)
    assert back["sent_bytes"] <= 256 * 1024, f"restart resent {back['sent_bytes']} bytes"
    assert back["out_of_sync_bytes"] == 0
    assert stop_both_and_compare(alpha, beta) == digest


# -- 8. job delete -----------------------------------------------------------------------------


def test_job_delete_unlocks_the_target_and_keeps_its_data(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    alpha, beta = pair(start_node, "64MiB")
    ok("nbdcopy", str(random_file(tmp_path / "payload.bin", 16 * MiB)), alpha.uri())
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    fio(alpha.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M",
        "--io_size=2M", "--fsync=64")  # fmt: skip
    digest = sha256(data1(alpha))
    assert sha256(data1(beta)) == digest
    vkil = alpha.directory / "state" / "bitmaps" / "web@beta:data1.vkil"
    assert vkil.exists()

    with alpha.api() as api:
        response = api.delete("/jobs/web")
        assert response.status_code == 200, response.text
        assert response.json() == {"deleted": "web", "warnings": []}
        assert api.get("/jobs").json() == []
    assert alpha.status()["mirrors"] == []
    assert volume_view(alpha)["role"] == "standalone"
    assert not vkil.exists()
    assert not (alpha.directory / "state" / "jobs" / "web.json").exists()

    deadline = time.monotonic() + 5
    while (view := volume_view(beta))["role"] != "standalone":
        assert time.monotonic() < deadline, f"beta:data1 still {view}"
        time.sleep(0.05)
    assert view["locked"] is None, view
    assert sha256(data1(beta)) == digest, "deleting the job changed the target's data"

    # beta:data1 is an ordinary volume again: it takes writes and no longer follows alpha.
    fresh = random_file(tmp_path / "fresh.bin", 4 * MiB)
    ok("nbdcopy", str(fresh), beta.uri())
    with data1(beta).open("rb") as f:
        assert f.read(4 * MiB) == fresh.read_bytes()
    ok("nbdcopy", str(random_file(tmp_path / "more.bin", 4 * MiB)), alpha.uri())
    codes = {"alpha": alpha.stop(), "beta": beta.stop()}
    assert codes == {"alpha": 0, "beta": 0}
    with data1(beta).open("rb") as f:
        assert f.read(4 * MiB) == fresh.read_bytes()
