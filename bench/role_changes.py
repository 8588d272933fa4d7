"""Time of role changes: switchover and failover, side by side with restarting the source.

How this works, in one run (two daemons on this machine, a 64 MiB sync mirror):

1. **switchover**: ``POST /jobs/web/switchover`` to the target node, timed from the request
   to the first write the new source acknowledges (a raw NBD client retrying that write
   from the moment the request is sent); back and forth ``--repeat`` times, idle and with a
   client writing (tests/support/acked_writer.py, 4 KiB writes at QD1, following the source).
   After each, the new source's ``resync_sent_bytes`` must not move: nothing resent.
2. **anchor**: the same move done by restarting the source's daemon (SIGTERM, start, first
   write acknowledged): what a role change costs that keeps no connection up.
3. **failover**: the source is killed (kill -9); ``POST /volumes/data1/promote`` on the
   target, timed to the first write acknowledged there; then the old source restarts, gives
   way, and the bytes its partial resync sent are reported beside the union of both sides'
   marked regions.

It prints p50 and max of each, and their ratio to the restart anchor.  Every daemon is
stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/support helpers

from tests.integration.rawnbd import NbdClosed, NbdTimeout, RawNbd
from tests.support.acked_writer import AckedWriter, block_bytes
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port


def first_write(socket: Path, since: float, timeout: float = 30) -> float:
    """Seconds from ``since`` until ``socket``'s export acknowledged a write."""
    while time.monotonic() < since + timeout:
        try:
            with RawNbd.open(socket, "data1", timeout=2) as client:
                writable = client.export is not None and not client.export.flags & 2
                if writable and client.write(0, block_bytes(0, 1)).error == 0:
                    return time.monotonic() - since
        except (NbdClosed, NbdTimeout, OSError, AssertionError):
            pass
        time.sleep(0.001)
    raise TimeoutError(f"no write taken on {socket}")


def wait(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def mirror(node: LocalNode, target: str) -> dict[str, object]:
    views = node.status()["mirrors"]
    return next(m for m in views if m["target"] == target)  # type: ignore[union-attr, index]


def switchovers(nodes: dict[str, LocalNode], repeat: int, loaded: bool) -> list[float]:
    times = []
    writer = None
    if loaded:
        writer = AckedWriter([n.nbd_socket for n in nodes.values()], seed=7)
        writer.start()
        writer.wait_writes(200)
    source, target = "alpha", "beta"
    for _ in range(repeat):
        with nodes[source].api() as api:
            started = time.monotonic()
            answer = api.post("/jobs/web/switchover", json={"to": target}, timeout=60)
        assert answer.status_code == 200, answer.text
        times.append(first_write(nodes[target].nbd_socket, started))
        view = mirror(nodes[target], f"{source}:data1")
        wait(lambda t=target, s=source: mirror(nodes[t], f"{s}:data1")["state"] == "Mirroring")
        assert view["resync_sent_bytes"] == 0, view
        source, target = target, source
    if writer is not None:
        writer.finish()
    if source != "alpha":  # leave alpha the source
        with nodes[source].api() as api:
            api.post("/jobs/web/switchover", json={"to": "alpha"}, timeout=60)
    return times


def restarts(nodes: dict[str, LocalNode], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        nodes["alpha"].stop()
        nodes["alpha"].start()
        times.append(first_write(nodes["alpha"].nbd_socket, started))
        wait(lambda: mirror(nodes["alpha"], "beta:data1")["state"] == "Mirroring")
    return times


def failover(nodes: dict[str, LocalNode]) -> tuple[float, int, int]:
    """(seconds from promote to the first write, bytes the return's resync sent, bytes
    beta marked before alpha returned)."""
    writer = AckedWriter([nodes["alpha"].nbd_socket], seed=9)
    writer.start()
    writer.wait_writes(500)
    nodes["alpha"].kill()
    writer.finish()
    with nodes["beta"].api() as api:
        while True:
            started = time.monotonic()
            answer = api.post("/volumes/data1/promote", json={}, timeout=60)
            if "connected and serving" not in answer.text:
                break
            time.sleep(0.01)
    assert answer.status_code == 200, answer.text
    seconds = first_write(nodes["beta"].nbd_socket, started)
    marked = int(mirror(nodes["beta"], "alpha:data1")["out_of_sync_bytes"])  # type: ignore[call-overload]
    nodes["alpha"].start()
    wait(lambda: mirror(nodes["beta"], "alpha:data1")["state"] == "Mirroring")
    resent = int(mirror(nodes["beta"], "alpha:data1")["resync_sent_bytes"])  # type: ignore[call-overload]
    return seconds, resent, marked


def summary(name: str, times: list[float], anchor: float) -> str:
    p50 = statistics.median(times)
    return (f"| {name} | {len(times)} | {p50 * 1000:.1f} | {max(times) * 1000:.1f} | "
            f"{p50 / anchor:.2f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vk-bench-roles-"))
    ports = {"alpha": free_tcp_port(), "beta": free_tcp_port()}
    nodes = {
        name: LocalNode(root / name, name, [VolumeSpec("data1", "64MiB")], peer_port=port,
                        peers={o: p for o, p in ports.items() if o != name})
        for name, port in ports.items()
    }  # fmt: skip
    try:
        for node in nodes.values():
            node.start()
        body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
        with nodes["alpha"].api() as api:
            assert api.post("/jobs", json=body).status_code == 201
        wait(lambda: mirror(nodes["alpha"], "beta:data1")["state"] == "Mirroring")
        anchor = restarts(nodes, args.repeat)
        idle = switchovers(nodes, args.repeat, loaded=False)
        loaded = switchovers(nodes, args.repeat, loaded=True)
        seconds, resent, marked = failover(nodes)
    finally:
        for node in nodes.values():
            node.stop()
    base = statistics.median(anchor)
    print("| role change (to the first write acknowledged) | n | p50 ms | max ms | vs restart |")
    print("|---|---:|---:|---:|---:|")
    print(summary("restart of the source's daemon (anchor)", anchor, base))
    print(summary("switchover, idle", idle, base))
    print(summary("switchover, a client writing (4 KiB QD1)", loaded, base))
    print(summary("failover: promote after kill -9", [seconds], base))
    print(
        f"\nold source's return after the failover: resync sent {resent} bytes; the new "
        f"source had marked {marked} (the rest: the old source's unacknowledged extents)"
    )


if __name__ == "__main__":
    main()
