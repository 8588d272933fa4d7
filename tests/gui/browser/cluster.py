"""Two real nodes for the GUI's tests: alpha and beta, volumes data1 and data2 (16 MiB) each."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page

from volkeeper_lab.launcher import LocalGui, LocalNode, VolumeSpec, free_tcp_port

Shoot = Callable[[Page, str], Path]  # the ``shoot`` fixture: a screenshot named so


class Cluster:
    def __init__(self, root: Path) -> None:
        ports = {"alpha": free_tcp_port(), "beta": free_tcp_port()}
        volumes = [VolumeSpec("data1", size="16MiB"), VolumeSpec("data2", size="16MiB")]
        self.alpha, self.beta = (
            LocalNode(root / name, name, volumes, peer_port=ports[name],
                      peers={o: p for o, p in ports.items() if o != name})
            for name in ("alpha", "beta")
        )  # fmt: skip
        self.root = root

    def start(self) -> None:
        self.beta.start()
        self.alpha.start()

    def stop(self) -> None:
        for node in (self.alpha, self.beta):
            node.stop()

    def gui(self, *args: str, listen: str = "") -> LocalGui:
        return LocalGui(self.root / "gui", [self.alpha, self.beta], listen, list(args))

    def create_job(self, name: str = "web", target: str = "beta:data1", **settings: object) -> None:
        body = {"name": name, "source": "alpha:data1", "target": target, "confirm": True,
                **settings}  # fmt: skip
        with self.alpha.api() as api:
            answer = api.post("/jobs", json=body)
        assert answer.status_code == 201, answer.text

    def mirrored_job(self, timeout: float = 30) -> None:
        """Job ``web`` (alpha:data1 -> beta:data1), once its mirror is Mirroring."""
        self.create_job()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.alpha.api() as api:
                states = [m["state"] for m in api.get("/jobs").json()[0]["mirrors"]]
            if states == ["Mirroring"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"job web did not reach Mirroring: {states}")
