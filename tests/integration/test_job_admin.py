"""Administering jobs end to end: refusals, lock/unlock, idempotence, release, events, status,
config-declared jobs and reload, restarts -- with real daemons on loopback.

Nodes are started with the ``start_node`` fixture (``alpha`` is the source; ``beta`` and
``gamma`` are targets, and a node that is a source names its targets in ``[peers]``).  Data is
written and read with a real NBD client (nbdcopy) and checked as sha256 of the backing
files.  A refusal must leave nothing half-created on either side: no job, no intent log
(``state/bitmaps/*.vkil``), no job record (``state/jobs/*.json``) on the source, and a target
volume that is standalone, unlocked and byte for byte unchanged.  Event streams are read
from ``volkeeper events --json`` (a subprocess, stopped by PID in a ``finally``) or from
``GET /events`` directly.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    MiB,
    cli,
    data1,
    ok,
    post_job,
    random_file,
    run,
    sha256,
    volume_view,
    wait_state,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

VOLKEEPER = [sys.executable, "-m", "volkeeper"]
SIZE = 16 * MiB

# -- helpers ---------------------------------------------------------------------------------


def node_arg(node: LocalNode) -> tuple[str, str]:
    return "--node", f"unix:{node.control_socket}"


def call(node: LocalNode, method: str, path: str, body: Any = None) -> httpx.Response:
    with node.api() as api:
        if body is None:
            return api.request(method, path)
        return api.request(method, path, json=body)


def create(
    node: LocalNode,
    name: str,
    source: str,
    target: str | list[str],
    confirm: bool = True,
    **settings: Any,
) -> httpx.Response:
    body = {"name": name, "source": source, "target": target, "mode": "sync", "confirm": confirm}
    return call(node, "POST", "/jobs", {**body, **settings})


def refused(response: httpx.Response, status: int, code: str, *words: str) -> str:
    """The answer is the error ``code`` with HTTP ``status``; its message names ``words``."""
    assert response.status_code == status, (
        f"expected {status}: {response.status_code} {response.text}"
    )
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], f"{word!r} not in the message: {error}"
    return str(error["message"])


def jobs_of(node: LocalNode) -> list[dict[str, Any]]:
    response = call(node, "GET", "/jobs")
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()
    return jobs


def state_files(node: LocalNode, pattern: str) -> list[str]:
    return sorted(p.name for p in (node.directory / "state").glob(pattern))


def nothing_left_on_source(node: LocalNode, jobs: list[str]) -> None:
    """The source runs exactly ``jobs``: nothing else in its API, intent logs or records."""
    assert sorted(j["name"] for j in jobs_of(node) if j["role"] == "source") == sorted(jobs)
    source_mirrors = [m for m in node.status()["mirrors"] if m["role"] == "source"]  # type: ignore[attr-defined]
    assert sorted({m["job"] for m in source_mirrors}) == sorted(jobs), source_mirrors
    logs = state_files(node, "bitmaps/*.vkil")
    assert sorted({name.partition("@")[0] for name in logs}) == sorted(jobs), logs
    assert state_files(node, "jobs/*.json") == sorted(f"{job}.json" for job in jobs)


def untouched(node: LocalNode, volume: str, digest: str) -> None:
    """A volume that was refused as a target: standalone, unlocked, its bytes as they were."""
    view = volume_view(node, volume)
    assert (view["role"], view["locked"]) == ("standalone", None), view
    assert not (node.directory / "state" / "targets" / f"{volume}.json").exists()
    path = node.volume_path(next(v for v in node.volumes if v.name == volume))
    assert sha256(path) == digest, f"{node.name}:{volume} changed"


def fill(node: LocalNode, volume: str, tmp_path: Path, size: int = 4 * MiB) -> str:
    """Random bytes at the start of a (writable) volume, through its NBD export."""
    ok("nbdcopy", str(random_file(tmp_path / f"fill-{node.name}-{volume}.bin", size)),
       node.uri(volume))  # fmt: skip
    return sha256(node.volume_path(next(v for v in node.volumes if v.name == volume)))


def mirror_of(node: LocalNode, job: str, target: str) -> dict[str, Any]:
    mirrors = node.status()["mirrors"]
    found = [m for m in mirrors if m["job"] == job and m["target"] == target]  # type: ignore[attr-defined]
    assert len(found) == 1, f"no single mirror {job} -> {target} on {node.name}: {mirrors}"
    return found[0]  # type: ignore[no-any-return]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not {what} after {timeout} s (last: {value!r})"
        time.sleep(0.05)


def wait_mirror(
    node: LocalNode, job: str, target: str, state: str, timeout: float = 30.0
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = mirror_of(node, job, target)
        return bool(last["state"] == state)

    try:
        wait_for(f"{job} -> {target} {state}", reached, timeout)
    except AssertionError:
        raise AssertionError(
            f"{job} -> {target} on {node.name} not {state!r} after {timeout} s: {last}\n"
            f"--- {node.name} log (tail) ---\n{node.log_text()[-3000:]}"
        ) from None
    return last


def target_view(node: LocalNode, job: str = "web") -> dict[str, Any]:
    """The mirror as the target node sees it."""
    mirrors = [m for m in node.status()["mirrors"] if m["job"] == job]  # type: ignore[attr-defined]
    assert len(mirrors) == 1 and mirrors[0]["role"] == "target", mirrors
    return mirrors[0]  # type: ignore[no-any-return]


def unlocked_standalone(node: LocalNode, volume: str) -> bool:
    view = volume_view(node, volume)
    return view["role"] == "standalone" and view["locked"] is None


class EventStream:
    """``volkeeper events --json`` on a node, read line by line by a thread."""

    def __init__(self, node: LocalNode, *options: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
        self.process = subprocess.Popen(
            [*VOLKEEPER, "events", "--json", *node_arg(node), *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s; seen: {self.seen[-20:]}") from None
        if line is None:
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"the event stream ended: {stderr}; seen: {self.seen[-20:]}")
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    def until(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """Events up to and including the first that matches."""
        deadline, events = time.monotonic() + timeout, []
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            events.append(event)
            if match(event):
                return events

    def drain(self, quiet: float = 0.5) -> list[dict[str, Any]]:
        """Whatever arrives until ``quiet`` seconds pass without an event."""
        events = []
        while True:
            try:
                line = self.lines.get(timeout=quiet)
            except queue.Empty:
                return events
            if line is None:
                return events
            event = json.loads(line)
            self.seen.append(event)
            events.append(event)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def is_state(target: str, state: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return (event["type"], event["object"], event.get("target"), event.get("state")) == (
            "change", "mirror", target, state,
        )  # fmt: skip

    return match


def state_changes(events: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    return [
        e for e in events
        if e["type"] == "change" and e["object"] == "mirror" and e.get("target") == target
        and "state" in e
    ]  # fmt: skip


# -- 1. refusals leave nothing behind ----------------------------------------------------------


def test_refusals_leave_nothing_half_created(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdcopy")
    gamma = start_node(
        "gamma",
        [VolumeSpec("data1", SIZE), VolumeSpec("data3", SIZE), VolumeSpec("small", SIZE // 2)],
    )
    beta = start_node(
        "beta",
        [VolumeSpec("data1", SIZE), VolumeSpec("data2", SIZE), VolumeSpec("data3", SIZE)],
        peers={"gamma": gamma.peer_port},
    )
    alpha = start_node(
        "alpha",
        [VolumeSpec("data1", SIZE), VolumeSpec("data2", SIZE)],
        peers={"beta": beta.peer_port, "gamma": gamma.peer_port, "delta": free_tcp_port()},
    )
    small = fill(gamma, "small", tmp_path)
    beta2 = fill(beta, "data2", tmp_path)
    fill(alpha, "data1", tmp_path)

    assert create(alpha, "web", "alpha:data1", "gamma:data1").status_code == 201
    wait_mirror(alpha, "web", "gamma:data1", "Mirroring")

    # A second source for a volume that is already a target (of alpha's job).
    answer = create(beta, "db", "beta:data1", "gamma:data1")
    refused(answer, 409, "conflict", "gamma:data1", "job 'web' from alpha:data1")
    assert jobs_of(beta) == []
    assert state_files(beta, "bitmaps/*.vkil") == [] and state_files(beta, "jobs/*.json") == []
    assert unlocked_standalone(beta, "data1")
    gamma1 = volume_view(gamma, "data1")
    assert gamma1["role"] == "target" and "web" in gamma1["locked"], gamma1
    assert mirror_of(alpha, "web", "gamma:data1")["state"] == "Mirroring"

    # A target smaller than the source.
    answer = create(alpha, "db", "alpha:data2", "gamma:small")
    refused(answer, 400, "bad_request", "gamma:small", "smaller")
    nothing_left_on_source(alpha, ["web"])
    untouched(gamma, "small", small)

    # A target volume that does not exist.
    answer = create(alpha, "db", "alpha:data2", "gamma:nope")
    refused(answer, 404, "not_found", "'nope'")
    nothing_left_on_source(alpha, ["web"])

    # Not confirmed.
    answer = create(alpha, "db", "alpha:data2", "beta:data2", confirm=False)
    refused(answer, 412, "confirmation_required", "beta:data2", "full resync")
    nothing_left_on_source(alpha, ["web"])
    untouched(beta, "data2", beta2)

    # One to two: the first target is fine, the second is refused -> the first is let go.
    for second, status, code, words in (
        ("gamma:small", 400, "bad_request", ("smaller",)),
        ("delta:data1", 503, "unavailable", ("cannot prepare delta:data1",)),
    ):
        answer = create(alpha, "db", "alpha:data2", ["beta:data2", second])
        refused(answer, status, code, *words)
        nothing_left_on_source(alpha, ["web"])
        untouched(beta, "data2", beta2)
        assert jobs_of(beta) == [], "beta still records the job it was claimed for"
        untouched(gamma, "small", small)

    # The target node is down.
    answer = create(alpha, "db", "alpha:data2", "delta:data1")
    refused(answer, 503, "unavailable", "cannot prepare delta:data1")
    nothing_left_on_source(alpha, ["web"])

    # A target volume that is the source of a mirror on its own node.
    assert create(beta, "bk", "beta:data3", "gamma:data3").status_code == 201
    wait_mirror(beta, "bk", "gamma:data3", "Mirroring")
    beta3 = sha256(beta.volume_path(beta.volumes[2]))
    answer = create(alpha, "db", "alpha:data2", "beta:data3")
    refused(answer, 409, "conflict", "beta:data3", "source of a mirror", "cannot be a target")
    nothing_left_on_source(alpha, ["web"])
    assert volume_view(beta, "data3")["role"] == "source"
    assert volume_view(beta, "data3")["locked"] is None
    assert sha256(beta.volume_path(beta.volumes[2])) == beta3
    assert [(j["name"], j["role"]) for j in jobs_of(beta)] == [("bk", "source")]

    # A source volume that is a target on its node.
    answer = create(gamma, "back", "gamma:data1", "beta:data2")
    refused(answer, 409, "conflict", "gamma:data1", "target", "cannot be a source")
    assert state_files(gamma, "bitmaps/*.vkil") == [] and state_files(gamma, "jobs/*.json") == []
    assert sorted((j["name"], j["role"]) for j in jobs_of(gamma)) == [
        ("bk", "target"), ("web", "target"),
    ]  # fmt: skip
    untouched(beta, "data2", beta2)

    # Everything that was created still runs.
    nothing_left_on_source(alpha, ["web"])
    assert state_files(alpha, "bitmaps/*.vkil") == ["web@gamma:data1.vkil"]
    assert mirror_of(alpha, "web", "gamma:data1")["state"] == "Mirroring"
    assert mirror_of(beta, "bk", "gamma:data3")["state"] == "Mirroring"


# -- 2. unlock / lock by hand on the target ------------------------------------------------------


def test_unlock_while_paused_then_continue_resyncs_fully_or_partly(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    size = 32 * MiB
    beta = start_node("beta", [VolumeSpec("data1", size)])
    alpha = start_node("alpha", [VolumeSpec("data1", size)], peers={"beta": beta.peer_port})
    ok("nbdcopy", str(random_file(tmp_path / "payload.bin", size)), alpha.uri())
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    assert sha256(data1(beta)) == sha256(data1(alpha))

    # Mirroring: no unlock, by API or CLI.
    answer = call(beta, "POST", "/volumes/data1/unlock")
    message = refused(answer, 409, "conflict", "beta:data1")
    text = f"{message} {answer.json()['error']['hint']}"
    assert "pause" in text.lower(), answer.json()
    done = cli("volume", "unlock", "data1", *node_arg(beta))
    assert done.returncode != 0 and "beta:data1" in done.stderr, done
    assert volume_view(beta)["locked"], "a refused unlock unlocked the volume"
    attempt = run("nbdcopy", str(random_file(tmp_path / "x.bin", MiB)), beta.uri())
    assert attempt.returncode != 0, "beta took a write while it is a locked target"

    # Round 1: pause, unlock, write on beta, continue -> a full resync overwrites beta.
    done = cli("mirror", "pause", "web", *node_arg(alpha))
    assert done.returncode == 0, done.stderr
    wait_state(alpha, "Paused")
    wait_for("beta: Paused", lambda: target_view(beta)["state"] == "Paused")
    done = cli("volume", "unlock", "data1", *node_arg(beta))
    assert done.returncode == 0, done.stderr
    assert "unlocked" in done.stdout, done.stdout
    again = call(beta, "POST", "/volumes/data1/unlock")  # idempotent
    assert again.status_code == 200, again.text
    assert again.json()["locked"] is None and again.json()["role"] == "target", again.json()
    assert target_view(beta)["unlocked"] is True

    junk = random_file(tmp_path / "junk.bin", 4 * MiB)
    ok("nbdcopy", str(junk), beta.uri())
    with data1(beta).open("rb") as f:
        assert f.read(4 * MiB) == junk.read_bytes(), "the write to the unlocked target is lost"
    assert sha256(data1(beta)) != sha256(data1(alpha))

    sent = wait_state(alpha, "Paused")["sent_bytes"]
    done = cli("mirror", "continue", "web", *node_arg(alpha))
    assert done.returncode == 0, done.stderr
    back = wait_state(alpha, "Mirroring", timeout=60)
    assert back["sent_bytes"] - sent >= size, f"not a full resync: sent {back['sent_bytes'] - sent}"
    view = volume_view(beta)
    assert view["role"] == "target" and view["locked"] and "web" in view["locked"], view
    assert target_view(beta)["unlocked"] is False
    assert sha256(data1(beta)) == sha256(data1(alpha)), "beta's own changes survived the resync"

    # Round 2: pause, unlock, no write, lock by hand, continue -> only a partial resync.
    assert call(alpha, "POST", "/jobs/web/mirror/pause").status_code == 200
    wait_for("beta: Paused", lambda: target_view(beta)["state"] == "Paused")
    assert call(beta, "POST", "/volumes/data1/unlock").status_code == 200
    assert volume_view(beta)["locked"] is None
    locked = call(beta, "POST", "/volumes/data1/lock")
    assert locked.status_code == 200, locked.text
    assert locked.json()["locked"] and "web" in locked.json()["locked"], locked.json()
    sent = mirror_of(alpha, "web", "beta:data1")["sent_bytes"]
    assert call(alpha, "POST", "/jobs/web/mirror/continue").status_code == 200
    back = wait_state(alpha, "Mirroring", timeout=30)
    assert back["sent_bytes"] - sent <= MiB, f"sent {back['sent_bytes'] - sent} after no write"
    assert sha256(data1(beta)) == sha256(data1(alpha))


# -- 3. idempotent commands ----------------------------------------------------------------------


def test_commands_are_idempotent(start_node: NodeFactory) -> None:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    record = alpha.directory / "state" / "jobs" / "web.json"
    events = EventStream(alpha, "--no-initial")
    try:
        time.sleep(0.5)  # the stream is subscribed
        for action, state in (("pause", "Paused"), ("continue", "Mirroring"), ("break", "Broken")):
            first = call(alpha, "POST", f"/jobs/web/mirror/{action}")
            assert first.status_code == 200, first.text
            if action != "continue":
                assert first.json()["mirrors"][0]["state"] == state, first.json()
            wait_state(alpha, state)
            events.drain()
            second = call(alpha, "POST", f"/jobs/web/mirror/{action}")
            assert second.status_code == 200, (action, second.text)
            assert second.json()["mirrors"][0]["state"] == state, second.json()
            assert state_changes(events.drain(), "beta:data1") == [], f"second {action}"
        done = cli("mirror", "break", "web", *node_arg(alpha))
        assert done.returncode == 0 and "Broken" in done.stdout, done

        changes = {"mode": "async", "queue_limit": "8MiB"}
        first = call(alpha, "PATCH", "/jobs/web/mirror", changes)
        assert first.status_code == 200, first.text
        (mirror,) = first.json()["mirrors"]
        assert (mirror["mode"], mirror["queue_limit_bytes"]) == ("async", 8 * MiB), mirror
        assert any(e.get("mode") == "async" for e in events.drain()), "no change event"
        stamp, text = record.stat().st_mtime_ns, record.read_text()
        second = call(alpha, "PATCH", "/jobs/web/mirror", changes)
        assert second.status_code == 200, second.text
        (same,) = second.json()["mirrors"]
        assert (same["mode"], same["queue_limit_bytes"]) == ("async", 8 * MiB), same
        done = cli("mirror", "set", "web", "--mode", "async", "--queue-limit", "8MiB",
                   *node_arg(alpha))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert events.drain() == [], "setting the same values again changed something"
        assert (record.stat().st_mtime_ns, record.read_text()) == (stamp, text)
    finally:
        events.stop()

    gone = call(alpha, "DELETE", "/jobs/web")
    assert gone.status_code == 200 and gone.json() == {"deleted": "web", "warnings": []}, gone.text
    again = call(alpha, "DELETE", "/jobs/web")
    refused(again, 404, "not_found", "no job named 'web'")
    done = cli("job", "delete", "web", *node_arg(alpha))
    assert done.returncode != 0 and "no job named 'web'" in done.stderr, done
    assert "Traceback" not in done.stderr
    wait_for("beta:data1 released", lambda: unlocked_standalone(beta, "data1"), 5)


# -- 4. release on the target when the source is gone --------------------------------------------


def test_release_target_when_the_source_is_gone(start_node: NodeFactory, tmp_path: Path) -> None:
    need("nbdcopy")
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    ok("nbdcopy", str(random_file(tmp_path / "payload.bin", 8 * MiB)), alpha.uri())
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")

    answer = call(beta, "POST", "/volumes/data1/release")
    refused(answer, 409, "conflict", "beta:data1", "job 'web' from alpha:data1")
    assert volume_view(beta)["role"] == "target"
    done = cli("volume", "release", "data1", *node_arg(beta))
    assert done.returncode != 0 and "connected" in done.stderr, done
    assert wait_state(alpha, "Mirroring")

    assert alpha.stop() == 0  # gone for good
    digest = sha256(data1(alpha))
    assert sha256(data1(beta)) == digest
    wait_for("beta disconnected", lambda: target_view(beta)["state"] != "Mirroring", 10)

    answer = call(beta, "POST", "/volumes/data1/release")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["role"], answer.json()["locked"]) == ("standalone", None), answer.json()
    assert jobs_of(beta) == []
    assert [m for m in beta.status()["mirrors"]] == []  # type: ignore[attr-defined]
    assert not (beta.directory / "state" / "targets" / "data1.json").exists()
    assert sha256(data1(beta)) == digest, "release changed the data"
    fresh = random_file(tmp_path / "fresh.bin", MiB)
    ok("nbdcopy", str(fresh), beta.uri())  # an ordinary volume again
    with data1(beta).open("rb") as f:
        assert f.read(MiB) == fresh.read_bytes()

    beta.stop()  # and it stays released across a restart
    beta.start()
    assert unlocked_standalone(beta, "data1")
    assert jobs_of(beta) == []


# -- 5. events -----------------------------------------------------------------------------------


def test_event_stream_follows_create_pause_continue(start_node: NodeFactory) -> None:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    events = EventStream(alpha)
    try:
        initial = events.until(lambda e: (e["type"], e["object"]) == ("exists", "-"), 10)
        assert all(e["type"] == "exists" for e in initial), initial
        objects = {e["object"] for e in initial}
        assert {"node", "volume", "-"} <= objects, initial
        assert any(e.get("volume") == "data1" for e in initial if e["object"] == "volume")

        assert post_job(alpha).status_code == 201
        live = events.until(is_state("beta:data1", "Mirroring"), 30)
        created = [(e["type"], e["object"]) for e in live if e["type"] == "create"]
        assert ("create", "job") in created and ("create", "mirror") in created, live
        first_state = next(i for i, e in enumerate(live) if "state" in e)
        before = {(e["type"], e["object"]) for e in live[:first_state]}
        assert {("create", "job"), ("create", "mirror")} <= before, live
        mirror_created = next(e for e in live if (e["type"], e["object"]) == ("create", "mirror"))
        assert (mirror_created["job"], mirror_created["target"]) == ("web", "beta:data1")
        states = [e["state"] for e in state_changes(live, "beta:data1")]
        assert "Resyncing" in states and states[-1] == "Mirroring", states

        assert call(alpha, "POST", "/jobs/web/mirror/pause").status_code == 200
        live += events.until(is_state("beta:data1", "Paused"), 10)
        assert call(alpha, "POST", "/jobs/web/mirror/continue").status_code == 200
        tail = events.until(is_state("beta:data1", "Mirroring"), 30)
        live += tail
        states = [e["state"] for e in state_changes(tail, "beta:data1")]
        assert states[0] == "Resync pending" and states[-1] == "Mirroring", states
        pause = next(e for e in live if is_state("beta:data1", "Paused")(e))
        assert (pause["was"], pause["job"], pause["source"]) == ("Mirroring", "web", "alpha:data1")
        assert pause["cause"], pause

        seqs = [e["seq"] for e in live]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0, seqs
        for event in initial + live:
            assert {"seq", "time", "type", "object"} <= event.keys(), event
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"]), event
            assert event["type"] in ("exists", "create", "change", "destroy"), event
    finally:
        events.stop()

    # The same stream over HTTP, read with httpx: Server-Sent Events framing.
    transport = httpx.HTTPTransport(uds=str(alpha.control_socket))
    timeout = httpx.Timeout(10.0, read=10.0)
    frames: list[dict[str, str]] = []
    with (
        httpx.Client(transport=transport, base_url="http://node", timeout=timeout) as client,
        client.stream("GET", "/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        frame: dict[str, str] = {}
        paused = False
        for line in lines:
            if line:
                field, _, value = line.partition(": ")
                frame[field] = value
                continue
            if not frame:
                continue
            frames.append(frame)
            data = json.loads(frame["data"])
            if (data["type"], data["object"]) == ("exists", "-") and not paused:
                paused = True
                assert call(alpha, "POST", "/jobs/web/mirror/pause").status_code == 200
            if data.get("state") == "Paused" and data["type"] == "change":
                break
            frame = {}
    assert paused, frames
    for frame in frames:
        assert set(frame) == {"id", "event", "data"}, frame
        data = json.loads(frame["data"])
        assert frame["id"] == str(data["seq"]) and frame["event"] == data["type"], frame
    exists = [json.loads(f["data"]) for f in frames if f["event"] == "exists"]
    assert any(e["object"] == "mirror" and e.get("state") == "Mirroring" for e in exists), exists
    assert json.loads(frames[-1]["data"])["seq"] > seqs[-1]


# -- 6. status --json and --watch ----------------------------------------------------------------

STATUS_KEYS = {"node", "volumes", "mirrors"}
VOLUME_KEYS = {"name", "size", "sector_size", "role"}
MIRROR_KEYS = {
    "job", "source", "target", "mode", "state", "out_of_sync_bytes", "sent_bytes",
    "compression", "throttle", "resync",
}  # fmt: skip
RESYNC_KEYS = {"done_bytes", "total_bytes", "rate_bytes_per_s", "eta_s"}


def test_status_json_is_stable(start_node: NodeFactory) -> None:
    beta = start_node("beta", [VolumeSpec("data1", SIZE), VolumeSpec("spare", SIZE, 4096)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")

    done = cli("status", "--json", *node_arg(alpha))
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status.keys() >= STATUS_KEYS and status["node"] == "alpha", status
    (volume,) = status["volumes"]
    assert volume.keys() >= VOLUME_KEYS, volume
    assert (volume["name"], volume["size"], volume["sector_size"], volume["role"]) == (
        "data1", SIZE, 512, "source",
    )  # fmt: skip
    (mirror,) = status["mirrors"]
    assert mirror.keys() >= MIRROR_KEYS, sorted(MIRROR_KEYS - mirror.keys())
    assert mirror["resync"].keys() >= RESYNC_KEYS, mirror["resync"]
    assert (mirror["job"], mirror["source"], mirror["target"], mirror["mode"]) == (
        "web", "alpha:data1", "beta:data1", "sync",
    )  # fmt: skip
    assert (mirror["state"], mirror["out_of_sync_bytes"]) == ("Mirroring", 0), mirror
    assert mirror["sent_bytes"] >= SIZE and mirror["compression"] == "none", mirror
    assert mirror["throttle"] is None, mirror
    assert mirror["resync"]["eta_s"] is None and mirror["resync"]["total_bytes"] == 0, mirror
    assert all(isinstance(mirror["resync"][k], int) for k in RESYNC_KEYS - {"eta_s"}), mirror

    done = cli("status", "--json", *node_arg(beta))
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["node"] == "beta"
    roles = {v["name"]: (v["role"], v["sector_size"]) for v in status["volumes"]}
    assert roles == {"data1": ("target", 512), "spare": ("standalone", 4096)}, roles
    (mirror,) = status["mirrors"]
    assert mirror.keys() >= MIRROR_KEYS and mirror["resync"].keys() >= RESYNC_KEYS, mirror
    assert (mirror["job"], mirror["source"], mirror["target"], mirror["state"]) == (
        "web", "alpha:data1", "beta:data1", "Mirroring",
    )  # fmt: skip


def test_status_watch_on_a_terminal_redraws_until_ctrl_c(start_node: NodeFactory) -> None:
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)])
    output, code = watch_on_a_terminal(alpha, 1.5)
    assert code in (0, 130), (code, output[-2000:])
    assert "Traceback" not in output, output[-3000:]
    assert output.count("node alpha") >= 2, f"drawn {output.count('node alpha')} times:\n{output}"
    assert "data1" in output


def test_status_watch_into_a_pipe_prints_every_interval(start_node: NodeFactory) -> None:
    """A log file or ``| tee`` gets a status per interval too, not only the last one."""
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)])
    env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"} | {"COLUMNS": "200"}
    process = subprocess.Popen(
        [*VOLKEEPER, "status", "--watch", "--interval", "0.3", *node_arg(alpha)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode in (0, 130), (process.returncode, err)
    assert b"Traceback" not in err, err.decode()
    drawn = out.count(b"node alpha")
    assert drawn >= 2, f"status --watch into a pipe printed the status {drawn} time(s)"


def watch_on_a_terminal(node: LocalNode, seconds: float) -> tuple[str, int]:
    """Run ``status --watch --interval 0.3`` on a pseudo-terminal, SIGINT after ``seconds``."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
    env |= {"COLUMNS": "200", "LINES": "60", "TERM": "xterm"}
    process = subprocess.Popen(
        [*VOLKEEPER, "status", "--watch", "--interval", "0.3", *node_arg(node)],
        stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    chunks: list[bytes] = []

    def read_for(duration: float) -> None:
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([controller], [], [], min(left, 0.1))
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the other side closed
                    return
                if not chunk:
                    return
                chunks.append(chunk)

    try:
        read_for(seconds)
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            read_for(0.2)
        read_for(0.2)
        code = process.wait(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text), code  # without colours and moves


# -- 7. config-declared jobs and reload ----------------------------------------------------------


def job_toml(*mirrors: tuple[str, str, str], name: str = "web") -> str:
    text = f'\n[[job]]\nname = "{name}"\ndescription = "declared in the file"\n'
    for source, target, mode in mirrors:
        text += f'\n[[job.mirror]]\nsource = "{source}"\ntarget = "{target}"\nmode = "{mode}"\n'
    return text


def write_config(node: LocalNode, jobs: str = "") -> None:
    node.write_config()
    with node.config_path.open("a") as f:
        f.write(jobs)


def reload(node: LocalNode) -> subprocess.CompletedProcess[str]:
    return cli("reload", *node_arg(node))


def test_declared_jobs_apply_at_start_and_on_reload(start_node: NodeFactory) -> None:
    gamma = start_node("gamma", [VolumeSpec("data1", SIZE)])
    beta = start_node("beta", [VolumeSpec("data1", SIZE), VolumeSpec("data2", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert alpha.stop() == 0  # declare the job, then start alpha with it
    write_config(alpha, job_toml(("alpha:data1", "beta:data1", "sync")))
    alpha.start()
    (job,) = jobs_of(alpha)
    assert (job["name"], job["declared"], job["description"]) == (
        "web", True, "declared in the file",
    )  # fmt: skip
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    assert volume_view(beta, "data1")["role"] == "target"

    events = EventStream(alpha, "--no-initial")
    try:
        time.sleep(0.5)  # subscribed
        # A second mirror, to gamma (a new peer): added; the beta mirror goes on untouched.
        alpha.peers["gamma"] = gamma.peer_port
        gamma.admit("alpha", alpha.peer_port)  # the new target must know its source
        both = (("alpha:data1", "beta:data1", "sync"), ("alpha:data1", "gamma:data1", "async"))
        write_config(alpha, job_toml(*both))
        done = reload(alpha)
        assert done.returncode == 0, done.stderr
        assert "changed: web" in done.stdout and "peers changed: gamma" in done.stdout, done
        wait_mirror(alpha, "web", "gamma:data1", "Mirroring")
        assert volume_view(gamma, "data1")["role"] == "target"
        seen = events.drain()
        assert state_changes(seen, "beta:data1") == [], "the beta mirror was interrupted"
        assert [e["state"] for e in state_changes(seen, "gamma:data1")][-1] == "Mirroring"
        assert any(e["type"] == "create" and e.get("target") == "gamma:data1" for e in seen)
        assert mirror_of(alpha, "web", "beta:data1")["state"] == "Mirroring"
        assert mirror_of(alpha, "web", "gamma:data1")["mode"] == "async"

        # SIGHUP with the beta mirror's mode changed: applied live, no state change.
        write_config(alpha, job_toml(("alpha:data1", "beta:data1", "async"), both[1]))
        assert alpha.process is not None
        os.kill(alpha.process.pid, signal.SIGHUP)
        wait_for(
            "beta mirror async", lambda: mirror_of(alpha, "web", "beta:data1")["mode"] == "async"
        )
        seen = events.drain()
        assert state_changes(seen, "beta:data1") == [], seen
        assert state_changes(seen, "gamma:data1") == [], seen
        assert any(e.get("target") == "beta:data1" and e.get("mode") == "async" for e in seen)
        assert mirror_of(alpha, "web", "beta:data1")["state"] == "Mirroring"
        assert "config reloaded" in alpha.log_text()

        # A broken config: refused with the config's error line, nothing changes.
        before = jobs_of(alpha)
        broken = job_toml(("alpha:data1", "beta:data1", "fast"), both[1])
        write_config(alpha, broken)
        done = reload(alpha)
        assert done.returncode != 0, done
        assert re.search(r"mirror\[0\]\.mode.*fast", done.stderr), done.stderr
        assert "Traceback" not in done.stderr
        assert [m["mode"] for m in jobs_of(alpha)[0]["mirrors"]] == [
            m["mode"] for m in before[0]["mirrors"]
        ]
        assert events.drain() == [], "a config that does not load changed something"
        assert [m["state"] for m in jobs_of(alpha)[0]["mirrors"]] == ["Mirroring", "Mirroring"]
    finally:
        events.stop()

    # The job removed from the file: deleted, both targets unlocked.
    write_config(alpha)
    done = reload(alpha)
    assert done.returncode == 0, done.stderr
    assert "deleted: web" in done.stdout, done.stdout
    assert jobs_of(alpha) == []
    assert state_files(alpha, "bitmaps/*.vkil") == [] and state_files(alpha, "jobs/*.json") == []
    wait_for("beta:data1 released", lambda: unlocked_standalone(beta, "data1"), 5)
    wait_for("gamma:data1 released", lambda: unlocked_standalone(gamma, "data1"), 5)

    # A job created through the API is left alone by a declared job of the same name.
    assert post_job(alpha, "web", target="beta:data2").status_code == 201
    wait_mirror(alpha, "web", "beta:data2", "Mirroring")
    write_config(alpha, job_toml(("alpha:data1", "beta:data1", "sync")))
    answer = call(alpha, "POST", "/reload")
    assert answer.status_code == 200, answer.text
    (error,) = answer.json()["errors"]
    assert "web" in error and "API" in error, answer.json()
    assert answer.json()["created"] == [] and answer.json()["deleted"] == [], answer.json()
    (job,) = jobs_of(alpha)
    assert job["declared"] is False
    assert [m["target"] for m in job["mirrors"]] == ["beta:data2"], job
    assert unlocked_standalone(beta, "data1")
    done = reload(alpha)
    assert done.returncode != 0 and "web" in done.stderr, done


# -- 8. restarts keep jobs on both sides ---------------------------------------------------------


def test_restart_keeps_jobs_on_both_sides(start_node: NodeFactory) -> None:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    settings = {
        "description": "kept across restarts", "mode": "async", "queue_limit": "8MiB",
        "region_size": "64KiB",
    }  # fmt: skip
    assert create(alpha, "web", "alpha:data1", "beta:data1", **settings).status_code == 201
    wait_state(alpha, "Mirroring")
    (job,) = jobs_of(alpha)

    def settings_of(view: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (m["source"], m["target"], m["mode"], m["compression"], m["throttle"])
            for m in view["mirrors"]
        ]

    expected = [("alpha:data1", "beta:data1", "async", "none", None)]
    assert settings_of(job) == expected, job

    assert beta.stop() == 0
    beta.start()
    (served,) = jobs_of(beta)
    assert (served["name"], served["role"], served["source_node"]) == ("web", "target", "alpha")
    assert served["description"] == "kept across restarts", served
    assert settings_of(served) == expected, served
    assert volume_view(beta)["role"] == "target" and volume_view(beta)["locked"]
    wait_state(alpha, "Mirroring")

    assert alpha.stop() == 0
    alpha.start()
    (back,) = jobs_of(alpha)
    assert (back["name"], back["role"], back["declared"], back["description"]) == (
        "web", "source", False, "kept across restarts",
    )  # fmt: skip
    assert settings_of(back) == expected, back
    view = wait_state(alpha, "Mirroring")
    assert view["queue_limit_bytes"] == 8 * MiB, view
    assert view["intent_log"]["region_bytes"] == 64 * 1024, view
    assert view["sent_bytes"] <= MiB, f"a restart resent {view['sent_bytes']} bytes"
    assert [j["name"] for j in jobs_of(beta)] == ["web"]


def test_a_mirror_whose_target_node_left_the_config_locks_its_source(
    start_node: NodeFactory,
) -> None:
    """A job's target node is taken out of [peers] while alpha is down: the mirror cannot run,
    so nothing would track writes for beta.  alpha's volume is exported read-only, saying
    why, until the job is deleted (or the peer comes back)."""
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    assert alpha.stop() == 0
    alpha.peers = {}
    alpha.write_config()
    alpha.start()
    (view,) = alpha.status()["mirrors"]  # type: ignore[misc]
    assert view["state"] == "Unknown" and "not in [peers]" in view["last_error"], view
    locked = volume_view(alpha)["locked"]
    assert locked and "its mirror to beta:data1 cannot track writes" in locked, locked
    need("nbdcopy", "nbdkit")
    write = run("nbdcopy", "--", "[", "nbdkit", "pattern", "size=1M", "]", alpha.uri())
    assert write.returncode != 0 and "read-only" in write.stderr.lower(), write
    done = cli("job", "delete", "web", *node_arg(alpha))
    assert done.returncode == 0, done.stderr
    assert volume_view(alpha)["locked"] is None


def test_a_job_whose_record_is_unreadable_locks_its_source(start_node: NodeFactory) -> None:
    """The job record is damaged while alpha is down: the job cannot start, and its volume
    (found from the job's intent logs) takes no writes nobody would track."""
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    assert post_job(alpha).status_code == 201
    wait_state(alpha, "Mirroring")
    assert alpha.stop() == 0
    record = alpha.directory / "state" / "jobs" / "web.json"
    record.write_text(record.read_text()[:40])
    alpha.start()
    assert alpha.status()["mirrors"] == []
    locked = volume_view(alpha)["locked"]
    assert locked and "job record" in locked and "web.json unreadable" in locked, locked
    assert "fix or remove it, then restart the node" in locked
    need("nbdcopy", "nbdkit")
    write = run("nbdcopy", "--", "[", "nbdkit", "pattern", "size=1M", "]", alpha.uri())
    assert write.returncode != 0 and "read-only" in write.stderr.lower(), write
