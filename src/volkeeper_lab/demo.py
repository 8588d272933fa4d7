"""``make demo``: two nodes on this machine, one mirrored volume, a real NBD client writing.

How this works: nodes alpha (source) and beta (target) get identities and trust each other's
fingerprint (``volkeeper node init``, ``node trust``: the replication link is mutual TLS),
then start in ./demo-run with a 256 MiB
file-backed volume each.  nbdcopy writes 64 MiB of random data to alpha over NBD; a sync job
mirrors alpha:data1 to beta:data1 (full resync: Resyncing -> Mirroring).  Then beta is
stopped while the application keeps writing (Resync pending: the writes are marked in the
intent log), beta comes back, and the partial resync sends only the marked regions.  The job
then switches over to beta (the application writes there; nothing is resent) and back.
Finally both daemons stop and the two backing files are compared byte for byte.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from volkeeper.core.units import format_size
from volkeeper_lab.launcher import LocalGui, LocalNode, VolumeSpec, free_tcp_port

DEMO_DIR = Path("demo-run")
GUI_PORT = 8470
VOLUME_SIZE = 256 * 1024 * 1024
FIRST_WRITE = 64 * 1024 * 1024


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*command: str) -> str:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{command[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def cli(node: LocalNode, *args: str) -> str:
    return run(sys.executable, "-m", "volkeeper", *args, "--node", f"unix:{node.control_socket}")


def mirror(node: LocalNode) -> dict[str, Any]:
    mirrors: list[dict[str, Any]] = node.status()["mirrors"]  # type: ignore[assignment]
    return mirrors[0]


def wait_for(node: LocalNode, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline, shown = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        current = mirror(node)
        behind = format_size(current["out_of_sync_bytes"])
        line = f"   state: {current['state']:<15} out of sync: {behind}"
        if line != shown:
            print(line, flush=True)
            shown = line
        if current["state"] == state:
            return current
        time.sleep(0.1)
    raise SystemExit(f"the mirror did not reach {state} in {timeout} s: {current}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fio_writes(node: LocalNode, amount: str) -> None:
    run(
        "fio", "--name=app", "--ioengine=nbd", f"--uri={node.uri()}", "--rw=randwrite",
        "--bs=4k", "--iodepth=16", f"--size={VOLUME_SIZE}", f"--io_size={amount}",
        "--output-format=terse", f"--directory={DEMO_DIR.resolve()}",
    )  # fmt: skip


def introduce(alpha: LocalNode, beta: LocalNode) -> None:
    """Node identities, as an administrator sets them up: init on each, trust the other's."""
    step("node identities: each node makes its key, then trusts the other's fingerprint")
    fingerprints = {}
    for node in (alpha, beta):
        shown = node_cli(node, "node", "init", "--json")
        fingerprints[node.name] = json.loads(shown)["fingerprint"]
        print(f"   {node.name}: {fingerprints[node.name]}", flush=True)
    for node, other in ((alpha, beta), (beta, alpha)):
        print("   " + node_cli(node, "node", "trust", other.name, fingerprints[other.name]).strip())


def node_cli(node: LocalNode, *args: str) -> str:
    return run(sys.executable, "-m", "volkeeper", *args, "--config", str(node.write_config()))


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    ports = {"alpha": free_tcp_port(), "beta": free_tcp_port()}  # each in the other's [peers]
    alpha, beta = (
        LocalNode(DEMO_DIR / name, name, [VolumeSpec("data1", size=VOLUME_SIZE)],
                  peer_port=ports[name], peers={o: p for o, p in ports.items() if o != name},
                  secure=True)
        for name in ("alpha", "beta")
    )  # fmt: skip
    introduce(alpha, beta)
    step("starting two nodes: alpha (source) and beta (target), 256 MiB volume data1 each")
    beta.start()
    alpha.start()
    gui = LocalGui(DEMO_DIR / "gui", [alpha, beta], f"127.0.0.1:{gui_port()}")
    gui.start()
    atexit.register(gui.stop)  # also when a step fails
    step(f"the web GUI watches both nodes: open {gui.url}/ in a browser to follow the demo")
    try:
        step(f"the application writes {format_size(FIRST_WRITE)} of random data to alpha over NBD")
        data = DEMO_DIR / "random.bin"
        data.write_bytes(os.urandom(FIRST_WRITE))
        run("nbdcopy", str(data), alpha.uri())

        step("create a sync job: alpha:data1 -> beta:data1 (a full resync overwrites beta)")
        print(cli(alpha, "job", "create", "web", "--source", "alpha:data1",
                  "--target", "beta:data1", "--mode", "sync", "--yes"), end="")  # fmt: skip
        wait_for(alpha, "Mirroring")
        print(cli(alpha, "status"), end="")

        step("beta goes away; the application keeps writing to alpha")
        beta.stop()
        wait_for(alpha, "Resync pending")
        fio_writes(alpha, "4M")
        away = mirror(alpha)
        marked, sent_before = away["out_of_sync_bytes"], away["sent_bytes"]
        print(f"   writes while beta was away are marked in the intent log: {format_size(marked)}")

        step("beta comes back: partial resync of the marked regions only")
        beta.start()
        back = wait_for(alpha, "Mirroring")
        resent = back["sent_bytes"] - sent_before
        print(
            f"   partial resync sent {format_size(resent)} of a {format_size(VOLUME_SIZE)} "
            f"volume ({100 * resent / VOLUME_SIZE:.2f}%)"
        )
        fio_writes(alpha, "2M")

        step("switchover: beta becomes the source, alpha its target -- nothing is resent")
        print(cli(alpha, "job", "switchover", "web", "--to", "beta"), end="")
        moved = wait_for(beta, "Mirroring")
        fio_writes(beta, "2M")
        print(f"   the application writes to beta now; resync bytes sent: "
              f"{moved['resync_sent_bytes']}")  # fmt: skip
        step("and back to alpha")
        print(cli(beta, "job", "switchover", "web", "--to", "alpha"), end="")
        wait_for(alpha, "Mirroring")
        fio_writes(alpha, "1M")
    finally:
        step("stopping both nodes (SIGTERM)")
        codes = alpha.stop(), beta.stop()
        print(f"   exit status: alpha {codes[0]}, beta {codes[1]}")
    source, target = (
        sha256(alpha.volume_path(alpha.volumes[0])),
        sha256(beta.volume_path(beta.volumes[0])),
    )
    step("are the two volumes byte-identical?")
    print(f"   alpha:data1 sha256 {source}\n   beta:data1  sha256 {target}")
    if source != target:
        gui.stop()
        print("MISMATCH: the target differs from the source", file=sys.stderr)
        return 1
    if os.environ.get("KEEP"):
        keep_running(alpha, beta, gui)
    gui.stop()
    print(
        "\nDone: beta:data1 is an exact copy of alpha:data1.\n"
        f"Try next: start the nodes yourself with `volkeeper daemon --config "
        f"{alpha.config_path}` (and {beta.config_path}),\n"
        f"then `volkeeper status --config {alpha.config_path}`; write with `nbdcopy` or\n"
        f"`fio --ioengine=nbd` to {alpha.uri()};\n"
        "stop beta and watch the mirror go Resync pending, then resync when it returns;\n"
        f"`volkeeper mirror pause web --config {alpha.config_path}` (then `continue`),\n"
        "`volkeeper mirror set web --mode async --compression zstd:3 --throttle 50MiB` (live),\n"
        "`volkeeper job switchover web --to beta` (docs/failover.md: failover, Pacemaker),\n"
        "and `volkeeper events` in another terminal to watch every change as it happens.\n"
        f"The web GUI: `volkeeper gui --config {alpha.config_path} --config "
        f"{beta.config_path}`,\nthen open http://127.0.0.1:{GUI_PORT}/ (docs/gui.md); "
        "`make demo KEEP=1` leaves nodes and GUI running."
    )
    return max(codes)


def gui_port() -> int:
    """8470 (the GUI's default) when it is free, another free port otherwise."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", GUI_PORT))
        except OSError:
            return free_tcp_port()
    return GUI_PORT


def keep_running(alpha: LocalNode, beta: LocalNode, gui: LocalGui) -> None:
    step("KEEP=1: the nodes start again (the GUI picks them up by itself); Ctrl-C stops all")
    beta.start()
    alpha.start()
    print(f"   GUI: {gui.url}/\n   alpha: volkeeper status --config {alpha.config_path}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()
    finally:
        alpha.stop()
        beta.stop()


if __name__ == "__main__":
    sys.exit(main())
