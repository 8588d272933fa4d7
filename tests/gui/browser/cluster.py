"""Two real nodes for the GUI's tests: alpha and beta, volumes data1 and data2 (16 MiB) each."""

from __future__ import annotations

from pathlib import Path

from volkeeper_lab.launcher import LocalGui, LocalNode, VolumeSpec, free_tcp_port


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
