"""Watching a node in tests: its event stream and the rate of its wire bytes.

How this works: ``EventWatch`` runs ``volkeeper events --json`` in a subprocess (stopped by PID)
and reads what it printed; ``sample_wire`` / ``rate_of`` turn samples of a mirror's wire bytes
into a rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.mirroring import (
    VOLKEEPER,
    stop_process,
)
from volkeeper_lab.launcher import LocalNode


class EventWatch:
    """``volkeeper events --json --no-initial`` in a subprocess.  With no initial state there
    is no marker to wait for: a POST /reload of the unchanged config (which changes nothing
    but publishes a ``node`` event) is repeated until it shows, so the watch is subscribed."""

    def __init__(self, node: LocalNode, output: Path) -> None:
        self.output = output
        env = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
        argv = [
            *VOLKEEPER,
            "events",
            "--json",
            "--no-initial",
            "--node",
            f"unix:{node.control_socket}",
        ]
        with output.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + 20
        while not any(e["object"] == "node" for e in self.events()):
            assert self.process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, (
                f"the event watch never started: {output.read_text()}"
            )
            with node.api() as api:
                answer = api.post("/reload")
            assert answer.status_code == 200, answer.text
            time.sleep(0.2)

    def events(self) -> list[dict[str, Any]]:
        lines = self.output.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def of_mirror(self, job: str, target: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e["object"] == "mirror" and e.get("job") == job and e.get("target") == target
        ]

    def stop(self) -> None:
        stop_process(self.process, grace=2)


def sample_wire(node: LocalNode, seconds: float, every: float = 0.5) -> list[tuple[float, int]]:
    """(time, wire_bytes) of job web's mirror every ``every`` s for ``seconds``; the time is
    the middle of the request that read it."""
    samples: list[tuple[float, int]] = []
    with node.api() as api:
        start = time.monotonic()
        while True:
            asked = time.monotonic()
            views = api.get("/status").json()["mirrors"]
            answered = time.monotonic()
            (view,) = [v for v in views if v["job"] == "web" and v["role"] == "source"]
            samples.append(((asked + answered) / 2, view["wire_bytes"]))
            if answered - start >= seconds:
                return samples
            time.sleep(max(0.0, start + len(samples) * every - time.monotonic()))


def rate_of(samples: list[tuple[float, int]]) -> float:
    (t0, w0), (t1, w1) = samples[0], samples[-1]
    return (w1 - w0) / (t1 - t0)
