"""The GUI at scale: 3 nodes, 50 mirrors -- start time, page times, live updates, idle CPU.

How this works, in one run on this machine: three daemons (alpha, beta, gamma), each with 34
volumes of 4 MiB; 50 sync mirrors in a ring (17 alpha -> beta, 17 beta -> gamma, 16 gamma ->
alpha), all Mirroring before anything is timed.  Then, side by side with the anchor -- asking
the three nodes' control APIs for ``/status`` directly, which is the least any view of the
fleet costs:

* **start**: ``volkeeper gui`` from exec to its first answer (median of 3 starts);
* **overview**, **job page**, **node page**: median of 20 GETs each (every GET asks the nodes
  afresh, so a page costs at least one round of ``/status``);
* **live**: from a mirror's pause (API call) to the overview's stream carrying the changed
  region (median of 5);
* **idle CPU**: the GUI process's CPU over 10 s with one overview stream open.

Targets (the issue's): start under 2 s; the overview at most 4x the anchor; live under
1.5 s.  Every process is stopped by PID on the way out.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from volkeeper_lab.launcher import LocalGui, LocalNode, VolumeSpec, free_tcp_port

NAMES = ("alpha", "beta", "gamma")
PER_NODE = 34
RING = {"alpha": ("beta", 17), "beta": ("gamma", 17), "gamma": ("alpha", 16)}


def start_nodes(root: Path) -> dict[str, LocalNode]:
    ports = {name: free_tcp_port() for name in NAMES}
    volumes = [VolumeSpec(f"v{n:02d}", size="4MiB") for n in range(PER_NODE)]
    nodes = {
        name: LocalNode(root / name, name, volumes, peer_port=ports[name],
                        peers={o: p for o, p in ports.items() if o != name})
        for name in NAMES
    }  # fmt: skip
    for node in nodes.values():
        node.start()
    return nodes


def create_mirrors(nodes: dict[str, LocalNode]) -> None:
    for name, (peer, count) in RING.items():
        with nodes[name].api() as api:
            for n in range(count):
                # sources v00..v16 on each node; targets v17..v33 on the next one
                body = {"name": f"{name}-{n:02d}", "source": f"{name}:v{n:02d}",
                        "target": f"{peer}:v{n + 17:02d}", "confirm": True}  # fmt: skip
                answer = api.post("/jobs", json=body)
                assert answer.status_code == 201, answer.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = []
        for node in nodes.values():
            with node.api() as api:
                mirrors = api.get("/status").json()["mirrors"]
            states += [m["state"] for m in mirrors if m["role"] == "source"]
        if len(states) == 50 and set(states) == {"Mirroring"}:
            return
        time.sleep(0.2)
    raise SystemExit(f"the 50 mirrors did not reach Mirroring: {sorted(set(states))}")


def median_seconds(call: Callable[[], object], times: int) -> float:
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        spent.append(time.perf_counter() - began)
    return statistics.median(spent)


def anchor(clients: list[httpx.Client]) -> None:
    for client in clients:
        client.get("/status").raise_for_status()


def live_latency(gui: LocalGui, nodes: dict[str, LocalNode], job: str) -> float:
    """Seconds from a pause to the overview stream carrying the job's new state."""
    alpha = nodes["alpha"]
    with httpx.stream("GET", f"{gui.url}/live?view=overview", timeout=30) as stream:
        lines = stream.iter_lines()
        for line in lines:  # the first full render
            if line.startswith("data:"):
                break
        with alpha.api() as api:
            began = time.perf_counter()
            api.post(f"/jobs/{job}/mirror/pause", json={}).raise_for_status()
        row = re.compile(rf'<tr data-job="{job}".*?</tr>', re.DOTALL)
        for line in lines:
            if not line.startswith("data:"):
                continue
            shown = row.search(json.loads(line[5:])["html"])
            if shown and 'data-state="Paused"' in shown[0]:
                took = time.perf_counter() - began
                break
    with alpha.api() as api:
        api.post(f"/jobs/{job}/mirror/continue", json={}).raise_for_status()
    return took


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, stream_url: str, seconds: float) -> float:
    """The share of a core ``pid`` used over ``seconds`` with one live stream open."""
    with httpx.stream("GET", stream_url, timeout=None) as stream:
        reader = threading.Thread(target=lambda: sum(1 for _ in stream.iter_raw()), daemon=True)
        reader.start()
        before, began = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        used = (cpu_seconds(pid) - before) / (time.monotonic() - began)
    return used


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vk-gui-bench-") as tmp:
        root = Path(tmp)
        nodes = start_nodes(root)
        gui = LocalGui(root / "gui", list(nodes.values()))
        try:
            create_mirrors(nodes)
            starts = []
            for _ in range(3):
                starts.append(gui.start())
                gui.stop()
            gui.start()
            client = httpx.Client(base_url=gui.url, timeout=30)
            overview = client.get("/").text
            rows = overview.count('data-state="Mirroring"')
            apis = [node.api() for node in nodes.values()]
            base = median_seconds(lambda: anchor(apis), 20)
            pages = {
                "overview": median_seconds(lambda: client.get("/").raise_for_status(), 20),
                "job page": median_seconds(lambda: client.get("/jobs/alpha-03"), 20),
                "node page": median_seconds(lambda: client.get("/nodes/beta"), 20),
            }
            live = statistics.median(live_latency(gui, nodes, f"alpha-{n:02d}") for n in range(5))
            assert gui.process is not None
            idle = idle_cpu(gui.process.pid, f"{gui.url}/live?view=overview", 10.0)
        finally:
            gui.stop()
            for node in nodes.values():
                node.stop()
    print(f"GUI over 3 nodes and 50 mirrors ({rows} shown Mirroring on the overview)\n")
    print("| measure | GUI | anchor: /status of 3 nodes | ratio | target | pass |")
    print("|---|---:|---:|---:|---|---|")
    start = statistics.median(starts)
    print(f"| start | {start * 1000:.0f} ms | | | < 2 s | {'yes' if start < 2 else 'NO'} |")
    for name, seconds in pages.items():
        ratio = seconds / base
        target = "<= 4x" if name == "overview" else ""
        verdict = ("yes" if ratio <= 4 else "NO") if target else ""
        print(f"| {name} | {seconds * 1000:.1f} ms | {base * 1000:.1f} ms | {ratio:.1f}x | "
              f"{target} | {verdict} |")  # fmt: skip
    print(f"| live update | {live * 1000:.0f} ms | | | < 1.5 s | {'yes' if live < 1.5 else 'NO'} |")
    print(f"| idle CPU, one stream open | {idle * 100:.1f}% of a core | | | | |")
    return 0 if rows == 50 and start < 2 and live < 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
