"""Helpers of the end-to-end tests: run clients, drive nodes, wait for states, compare volumes.

How this works: plain functions over ``LocalNode`` (volkeeper_lab/launcher.py) and the programs the
tests run (the ``volkeeper`` CLI, fio, nbdcopy, libnbd's Python bindings); every process they
start is stopped by PID (``subprocess.run`` with a timeout, or ``stop_process``).  Volumes
are compared on disk with sha256; a difference is reported as the 4 KiB blocks that differ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import NodeFactory, need
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20
EXTENT = 4 * MiB  # the activity log's extent (core/activity_log.py DEFAULT_EXTENT_BYTES)
VOLKEEPER = [sys.executable, "-m", "volkeeper"]

# -- helpers ---------------------------------------------------------------------------------


def run(
    *argv: str, timeout: float = 60, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (subprocess.run kills it by PID on timeout)."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )


def ok(*argv: str, timeout: float = 60) -> str:
    done = run(*argv, timeout=timeout)
    assert done.returncode == 0, f"{argv[0]} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``volkeeper`` command with no inherited VOLKEEPER_NODE and a wide terminal."""
    env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
    env["COLUMNS"] = "200"
    return run(*VOLKEEPER, *args, env=env, timeout=30)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def stop_process(process: subprocess.Popen[Any], grace: float = 5) -> None:
    """Stop a client this test started, by its PID (fio runs with --thread: one process)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def data1(node: LocalNode) -> Path:
    return node.volume_path(next(v for v in node.volumes if v.name == "data1"))


def pair(
    start_node: NodeFactory,
    size: str = "64MiB",
    beta_volumes: list[VolumeSpec] | None = None,
    alpha_volumes: list[VolumeSpec] | None = None,
    bitmap_dir: Path | None = None,
) -> tuple[LocalNode, LocalNode]:
    """beta (the target) first, then alpha with beta in its [peers] (and its intent logs in
    ``bitmap_dir``, if given)."""
    beta = start_node("beta", beta_volumes or [VolumeSpec("data1", size)])
    alpha = start_node(
        "alpha", alpha_volumes or [VolumeSpec("data1", size)], peers={"beta": beta.peer_port},
        bitmap_dir=bitmap_dir,
    )  # fmt: skip
    return alpha, beta


def post_job(
    alpha: LocalNode,
    name: str = "web",
    source: str = "alpha:data1",
    target: str = "beta:data1",
    confirm: bool = True,
) -> httpx.Response:
    body = {"name": name, "source": source, "target": target, "mode": "sync", "confirm": confirm}
    with alpha.api() as api:
        return api.post("/jobs", json=body)


def mirror_view(node: LocalNode, job: str = "web") -> dict[str, Any]:
    mirrors = {m["job"]: m for m in node.status()["mirrors"]}  # type: ignore[attr-defined]
    assert job in mirrors, f"no mirror for job {job!r} on {node.name}: {sorted(mirrors)}"
    return mirrors[job]  # type: ignore[no-any-return]


def volume_view(node: LocalNode, name: str = "data1") -> dict[str, Any]:
    with node.api() as api:
        volumes = {v["name"]: v for v in api.get("/volumes").json()}
    return volumes[name]  # type: ignore[no-any-return]


def wait_state(
    node: LocalNode, state: str, timeout: float = 30.0, job: str = "web"
) -> dict[str, Any]:
    return poll_state(node, lambda: mirror_view(node, job), state, timeout, f"mirror {job}")


def poll_state(
    node: LocalNode, read: Callable[[], dict[str, Any]], state: str, timeout: float, what: str
) -> dict[str, Any]:
    """``read()`` (a mirror's view) until its state is ``state``; fails after ``timeout``
    with the view and the tail of the node's log."""
    deadline = time.monotonic() + timeout
    view = read()
    while view["state"] != state:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} on {node.name} not {state!r} after {timeout}s: {view}\n"
                f"--- {node.name} log (tail) ---\n{node.log_text()[-4000:]}"
            )
        time.sleep(0.05)
        view = read()
    return view


def mirrored_pair(
    start_node: NodeFactory, size: str = "64MiB", bitmap_dir: Path | None = None
) -> tuple[LocalNode, LocalNode]:
    """``pair``, job web created (alpha:data1 -> beta:data1, sync) and Mirroring."""
    alpha, beta = pair(start_node, size, bitmap_dir=bitmap_dir)
    response = post_job(alpha)
    assert response.status_code == 201, response.text
    wait_state(alpha, "Mirroring")
    return alpha, beta


def stop_both_and_compare(alpha: LocalNode, beta: LocalNode) -> str:
    """Stop both daemons (exit 0 on SIGTERM) and require byte-identical backing files."""
    codes = {"alpha": alpha.stop(), "beta": beta.stop()}
    assert codes == {"alpha": 0, "beta": 0}, f"exit status on SIGTERM: {codes}"
    source, target = sha256(data1(alpha)), sha256(data1(beta))
    assert source == target, _first_difference(data1(alpha), data1(beta))
    return source


def _first_difference(a: Path, b: Path) -> str:
    """Which 4 KiB blocks differ, for a failure message a person can act on."""
    differing, offset = [], 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(4096), fb.read(4096)
            if not x and not y:
                break
            if x != y:
                differing.append(offset // 4096)
            offset += 4096
    first = ", ".join(str(block) for block in differing[:20])
    return (
        f"{a} and {b} differ in {len(differing)} 4 KiB blocks "
        f"({len(differing) * 4096} bytes); first block numbers: {first}"
    )


# -- fio ---------------------------------------------------------------------------------------


def fio_argv(uri: str, output: Path, *job: str) -> list[str]:
    need("fio")
    return [
        "fio", "--name=vk", "--thread", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
        f"--output={output}", *job,
    ]  # fmt: skip


def fio_result(output: Path) -> dict[str, Any]:
    text = output.read_text()
    document: dict[str, Any] = json.loads(text[text.index("{") :])
    (job,) = document["jobs"]
    return job  # type: ignore[no-any-return]


def fio(uri: str, cwd: Path, *job: str, timeout: float = 90) -> dict[str, Any]:
    """Run one fio job through its nbd engine; fails on any error or bad verify.

    fio's nbd engine ignores --directory: its verify state files land in ``cwd``.
    """
    output = cwd / f"fio-{time.monotonic_ns()}.json"
    done = run(*fio_argv(uri, output, *job), cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"fio failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    result = fio_result(output)
    assert result["error"] == 0, result
    return result


def start_fio(uri: str, cwd: Path, *job: str) -> tuple[subprocess.Popen[bytes], Path]:
    output = cwd / f"fio-{time.monotonic_ns()}.json"
    log = (cwd / "fio.stderr").open("ab")
    process = subprocess.Popen(
        fio_argv(uri, output, *job), cwd=cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL
    )
    log.close()
    return process, output


VERIFY = ("--verify=crc32c", "--do_verify=1", "--verify_fatal=1")


# -- libnbd ------------------------------------------------------------------------------------


@functools.cache
def python_with_libnbd() -> str | None:
    for python in (shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if python and os.path.exists(python) and run(python, "-c", "import nbd").returncode == 0:
            return python
    return None


def libnbd(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a script with libnbd's own Python bindings (``import nbd``)."""
    python = python_with_libnbd()
    if python is None:
        pytest.skip("no python3 on this host imports libnbd's nbd module (libnbd python3 pkg)")
    return run(python, "-c", script, *args, timeout=timeout)


class StateLog(threading.Thread):
    """Polls a node's /status and records every distinct state of one mirror."""

    def __init__(self, node: LocalNode, job: str = "web") -> None:
        super().__init__(daemon=True)
        self.node, self.job = node, job
        self.states: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with self.node.api() as api:
            while not self.done.is_set():
                self._poll(api)
                time.sleep(0.01)
            self._poll(api)  # the state when finished, however late the last poll was

    def _poll(self, api: httpx.Client) -> None:
        try:
            mirrors = api.get("/status").json()["mirrors"]
        except (httpx.HTTPError, ValueError, KeyError):
            mirrors = []
        for mirror in mirrors:
            state = mirror["state"]
            if mirror["job"] == self.job and (not self.states or self.states[-1] != state):
                self.states.append(state)

    def finish(self) -> list[str]:
        self.done.set()
        self.join(10)
        return self.states
