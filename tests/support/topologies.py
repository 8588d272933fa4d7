"""Helpers of the multi-node tests: three nodes, jobs over the API, loads, waits and comparisons.

How this works: plain functions over ``LocalNode`` and the control API; ``Load`` runs fio on a
source in the background and ``Events`` follows a node's event stream, both stopped by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import NodeFactory, need
from tests.support.mirroring import (
    VERIFY,
    VOLKEEPER,
    _first_difference,
    cli,
    fio_argv,
    fio_result,
    poll_state,
    sha256,
    stop_process,
)
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

SIZE = "32MiB"


def trio(
    start_node: NodeFactory,
    alpha: tuple[str, ...] = ("data1",),
    beta: tuple[str, ...] = ("data1",),
    gamma: tuple[str, ...] = ("data1",),
    size: str = SIZE,
) -> tuple[LocalNode, LocalNode, LocalNode]:
    """gamma, then beta (a source too, in some tests), then alpha, each knowing the later ones."""
    g = start_node("gamma", [VolumeSpec(name, size) for name in gamma])
    b = start_node("beta", [VolumeSpec(name, size) for name in beta], peers={"gamma": g.peer_port})
    a = start_node(
        "alpha",
        [VolumeSpec(name, size) for name in alpha],
        peers={"beta": b.peer_port, "gamma": g.peer_port},
    )
    return a, b, g


def full_mesh(start_node: NodeFactory, *names: str, size: str = SIZE) -> list[LocalNode]:
    """Nodes (started in this order) that each have every other one in [peers], one
    ``data1`` volume each."""
    ports = {name: free_tcp_port() for name in names}
    return [
        start_node(name, [VolumeSpec("data1", size)], peer_port=ports[name],
                   peers={other: port for other, port in ports.items() if other != name})
        for name in names
    ]  # fmt: skip


def two_way_pair(
    start_node: NodeFactory, size: str = SIZE, **job: object
) -> tuple[LocalNode, LocalNode]:
    """beta, then alpha, each in the other's [peers]; job web (alpha:data1 -> beta:data1,
    with the settings in ``job``) created."""
    beta, alpha = full_mesh(start_node, "beta", "alpha", size=size)
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
    with alpha.api() as api:
        assert api.post("/jobs", json={**body, **job}).status_code == 201
    return alpha, beta


def path(node: LocalNode, volume: str = "data1") -> Path:
    return node.volume_path(next(v for v in node.volumes if v.name == volume))


def control(node: LocalNode) -> str:
    return f"unix:{node.control_socket}"


def vk(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The volkeeper CLI against ``node``."""
    return cli(*args, "--node", control(node))


def vk_ok(node: LocalNode, *args: str) -> str:
    done = vk(node, *args)
    assert done.returncode == 0, f"volkeeper {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def mirrors(node: LocalNode) -> dict[tuple[str, str], dict[str, Any]]:
    """The node's mirror views by (job, target)."""
    views: list[dict[str, Any]] = node.status()["mirrors"]  # type: ignore[assignment]
    return {(m["job"], m["target"]): m for m in views}


def mirror(node: LocalNode, job: str, target: str) -> dict[str, Any]:
    found = mirrors(node)
    assert (job, target) in found, f"no mirror {job} -> {target} on {node.name}: {sorted(found)}"
    return found[(job, target)]


def wait_mirror(
    node: LocalNode, job: str, target: str, state: str, timeout: float = 30.0
) -> dict[str, Any]:
    what = f"mirror {job} -> {target}"
    return poll_state(node, lambda: mirror(node, job, target), state, timeout, what)


def volume(node: LocalNode, name: str = "data1") -> dict[str, Any]:
    with node.api() as api:
        found: dict[str, Any] = {v["name"]: v for v in api.get("/volumes").json()}[name]
    return found


def post(node: LocalNode, body: dict[str, Any]) -> Any:
    with node.api() as api:
        return api.post("/jobs", json=body)


def stop_in_order(*nodes: LocalNode) -> None:
    """Sources first: a clean stop of a source sends its last writes before the targets go."""
    codes = {node.name: node.stop() for node in nodes}
    assert all(code == 0 for code in codes.values()), f"exit status on SIGTERM: {codes}"


def assert_identical(*files: Path) -> None:
    first, *others = files
    digest = sha256(first)
    for other in others:
        assert sha256(other) == digest, _first_difference(first, other)


class Load(threading.Thread):
    """Background writes: fio randwrite+verify runs, one after the other, until finish()."""

    def __init__(self, uri: str, cwd: Path, offset: int, size: int, rate_iops: int = 800) -> None:
        super().__init__(daemon=True)
        need("fio")
        cwd.mkdir(parents=True, exist_ok=True)
        self.uri, self.cwd = uri, cwd
        self.job = (
            "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--offset={offset}", f"--size={size}",
            "--io_size=2m", f"--rate_iops={rate_iops}", *VERIFY,
        )  # fmt: skip
        self.halt = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self.runs, self.written = 0, 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            output = self.cwd / f"fio-{self.runs}.json"
            with (self.cwd / "fio.stderr").open("ab") as log:
                self.process = subprocess.Popen(
                    fio_argv(self.uri, output, *self.job),
                    cwd=self.cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            try:
                code = self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.errors.append("fio did not finish in 120 s")
                return
            if self.halt.is_set() and code != 0:
                return  # aborted by the fixture
            if code != 0:
                self.errors.append(f"fio exit {code}: {(self.cwd / 'fio.stderr').read_text()}")
                return
            result = fio_result(output)
            if result["error"] != 0:
                self.errors.append(f"fio error: {result}")
                return
            self.runs += 1
            self.written += result["write"]["io_bytes"]

    def wait_running(self, runs: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.runs < runs:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"background fio did not complete {runs} runs"
            time.sleep(0.05)

    def finish(self) -> int:
        """Let the current fio run end (with its verify), stop; returns bytes written."""
        self.halt.set()
        self.join(150)
        assert not self.is_alive(), "background fio did not stop"
        assert not self.errors, self.errors
        assert self.runs > 0, "background fio never completed a run"
        return self.written

    def abort(self) -> None:
        self.halt.set()
        if self.process is not None:
            stop_process(self.process, grace=2)
        self.join(10)


class Events:
    """``volkeeper events --json`` on a node, in a subprocess; its lines parsed at the end."""

    def __init__(self, node: LocalNode, output: Path) -> None:
        self.node, self.output = node, output
        env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
        with output.open("wb") as out:
            self.process = subprocess.Popen(
                [*VOLKEEPER, "events", "--json", "--node", control(node)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        # The initial state ends with {"type": "exists", "object": "-"}: subscribed from here.
        deadline = time.monotonic() + 20
        while not any(e["type"] == "exists" and e["object"] == "-" for e in self.events()):
            assert self.process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, f"no initial events: {output.read_text()}"
            time.sleep(0.05)

    def events(self) -> list[dict[str, Any]]:
        lines = self.output.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def live(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["type"] != "exists"]

    def states(self, target: str, job: str = "web") -> list[str]:
        """The states a source-side mirror went through (from its change events)."""
        return [
            e["state"]
            for e in self.live()
            if e["object"] == "mirror" and e.get("target") == target and e.get("job") == job
            and e["type"] == "change" and "state" in e
        ]  # fmt: skip

    def stop(self) -> None:
        stop_process(self.process, grace=2)
