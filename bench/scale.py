"""Scale (issue 15): 64 idle async mirrors on one node, and a 16 TiB volume's intent log.

How this works.  Part A runs the real daemon: nodes alpha and beta on this machine, 64 file
volumes each (16 MiB; --quick 4 MiB).  The same steps run with no mirror (the anchor), then
with 64 async mirrors ``alpha:vNN -> beta:vNN`` (one job each, over the control API, full
resync, all Mirroring, persisted by alpha): restart beta (its RSS before is kept: what the
full resyncs left), restart alpha ``--starts`` times and time exec -> control API answers and
exec -> every mirror Mirroring (medians); each daemon's CPU over ``--idle`` seconds in turn
(utime + stime, all threads, /proc/PID/stat) and VmRSS; on alpha, ``GET /status`` (median of 20) and
``volkeeper status --json`` (median of 10).  Ratios are value / the no-mirror anchor.

Part B runs in this process, because a 16 TiB mirror cannot be set up through the daemon
here: creating one always starts a full resync (no "skip the initial sync"; holes are read and
sent like data), so beta would receive and write 16 TiB -- hours, more than this disk holds
(ext4 caps a file at 16 TiB - 4 KiB anyway) or tmpfs's memory.  So the daemon's own classes do
what it would: ``IntentStore.create`` writes the log (in the work directory) with 1% of the
regions marked; ``IntentStore.open`` reads and checks it as a restart does (timed, then again
under tracemalloc for memory held and peak); ``DirtyBitmap.runs()`` and ``resync_pass`` (how
a resync pass starts) enumerate the marked regions.  1% is laid out as 16 contiguous extents
(a hot working set) or as random regions (the worst case), at region sizes 4 KiB (the
default), 64 KiB and 1 MiB.  The anchor is ``bytes.count`` over the same bitmap bytes: one C
pass over every byte.  ``runs()`` stops after ``--budget`` seconds and the rest is
extrapolated (marked ~); ``resync_pass`` walks the live bitmap as it goes, so the time to its
first chunk is what a resync's start costs the event loop, and a whole pass is timed when
the runs() walk was not cut short.  Every process started is stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from benchlib import cpu_seconds, reap, reap_children, run_benchmark, spawn

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.intent_log_format import Generations, Geometry
from volkeeper.core.resync_plan import resync_pass
from volkeeper.core.units import format_size, parse_size
from volkeeper.daemon.source.resync import BATCH_BYTES, CHUNK_BYTES
from volkeeper.io.intent_store import IntentStore, new_log_id
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale.json"
MIRRORS = 64
NAMES = ("alpha", "beta")
HUGE = 16 << 40  # 16 TiB
REGION_SIZES = (4096, 64 << 10, 1 << 20)
RESYNC = CHUNK_BYTES, BATCH_BYTES  # the daemon's
T = TypeVar("T")
_nodes: list[LocalNode] = []


@dataclass
class Row:
    measure: str
    value: str
    anchor: str = ""
    ratio: str = ""
    target: str = ""
    passed: bool | None = None


def seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def ratio(value: float, anchor: float) -> str:
    return f"{value / anchor:.2f}x" if anchor > 0 else ""


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def status_mib(pid: int | str, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def traced(call: Callable[[], T]) -> tuple[T, float, float]:
    """``call()``, and the MiB it left allocated and its peak (tracemalloc: slows it)."""
    tracemalloc.start()
    try:
        result = call()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held / (1 << 20), peak / (1 << 20)


# -- part A: 64 mirrors on the real daemon ----------------------------------------------------


def pid_of(node: LocalNode) -> int:
    assert node.process is not None
    return node.process.pid


def wait_mirroring(node: LocalNode, count: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with node.api() as api:
            mirrors = api.get("/status").json()["mirrors"]
        states = [m["state"] for m in mirrors if m["role"] == "source"]
        if states.count("Mirroring") == count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} mirrors not Mirroring after {timeout} s: {states}")
        time.sleep(0.05)


def run_cli(argv: list[str]) -> None:
    proc = spawn(argv, stdout=subprocess.DEVNULL)
    code = proc.wait()
    reap(proc)
    if code:
        raise RuntimeError(f"{' '.join(argv)} exited {code}")


def measure(
    alpha: LocalNode, beta: LocalNode, mirrors: int, args: argparse.Namespace
) -> dict[str, float]:
    out = {"rss_beta_before_restart_mib": status_mib(pid_of(beta))}  # what the resyncs left
    beta.stop()
    beta.start(timeout=60)
    to_api, to_mirroring = [], []
    for _ in range(args.starts):
        alpha.stop()
        began = time.monotonic()
        alpha.start(timeout=60)
        to_api.append(time.monotonic() - began)
        wait_mirroring(alpha, mirrors)
        to_mirroring.append(time.monotonic() - began)
    out["start_api_s"], out["start_mirroring_s"] = map(statistics.median, (to_api, to_mirroring))
    time.sleep(args.settle)
    for node in alpha, beta:
        pid, began = pid_of(node), time.monotonic()
        used = cpu_seconds(pid)
        time.sleep(args.idle)
        out[f"idle_{node.name}_pct"] = (cpu_seconds(pid) - used) / (time.monotonic() - began) * 100
        out[f"rss_{node.name}_mib"] = status_mib(pid)
    with alpha.api() as api:
        get = [timed(lambda: api.get("/status").raise_for_status()) for _ in range(args.api)]
    cli = [str(Path(sys.executable).with_name("volkeeper")), "status", "--node", alpha.control]
    run = [timed(lambda: run_cli([*cli, "--json"])) for _ in range(args.cli)]
    out["status_api_s"], out["status_cli_s"] = statistics.median(get), statistics.median(run)
    return out


def part_a(
    args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> tuple[list[Row], dict[str, Any]]:
    ports = {"alpha": free_tcp_port(), "beta": free_tcp_port()}
    volumes = [VolumeSpec(f"v{n:02d}", size=args.volume_size) for n in range(MIRRORS)]
    for name, peer in (("beta", "alpha"), ("alpha", "beta")):
        peers: dict[str, int | str] = {peer: ports[peer]}
        node = LocalNode(workdir / name, name, volumes, peers=peers, peer_port=ports[name])
        _nodes.append(node)
        node.start(timeout=60)
    beta, alpha = _nodes
    log(f"A: 2 nodes x {MIRRORS} volumes of {format_size(args.volume_size)}, no mirror ...")
    bare = measure(alpha, beta, 0, args)
    log(f"A: creating {MIRRORS} async mirrors (full resync each) ...")
    began = time.monotonic()
    with alpha.api() as api:
        for n in range(MIRRORS):
            volume = f"v{n:02d}"
            body = {"name": f"m{n:02d}", "source": f"alpha:{volume}", "target": f"beta:{volume}"}
            answer = api.post("/jobs", json=body | {"mode": "async", "confirm": True})
            if answer.status_code != 201:
                raise RuntimeError(f"POST /jobs: {answer.status_code} {answer.text}")
    wait_mirroring(alpha, MIRRORS)
    created = time.monotonic() - began
    log(f"A: {MIRRORS} mirrors Mirroring after {created:.1f} s; measuring ...")
    full = measure(alpha, beta, MIRRORS, args)

    def row(label: str, key: str, target: str = "", limit: float | None = None) -> Row:
        unit = key.rsplit("_", 1)[1]
        show = {"s": seconds, "pct": "{:.2f}%".format, "mib": "{:.1f} MiB".format}[unit]
        value, anchor = full[key], bare[key]
        verdict = None if limit is None else value < limit
        return Row(label, show(value), show(anchor), ratio(value, anchor), target, verdict)

    kib = {n: (full[f"rss_{n}_mib"] - bare[f"rss_{n}_mib"]) * 1024 / MIRRORS for n in NAMES}
    after_resyncs = f"{full['rss_beta_before_restart_mib']:.1f} MiB"
    rows = [
        Row(f"create {MIRRORS} mirrors -> all Mirroring", seconds(created)),
        row("startup: exec -> control API answers", "start_api_s"),
        row(f"startup: exec -> {MIRRORS} mirrors Mirroring", "start_mirroring_s", "< 5 s", 5),
        row("idle CPU, source (% of a core)", "idle_alpha_pct", "< 2%", 2),
        row("idle CPU, target (% of a core)", "idle_beta_pct"),
        row("RSS, source", "rss_alpha_mib"),
        Row("memory per mirror, source", f"{kib['alpha']:.0f} KiB"),
        row("RSS, target", "rss_beta_mib"),
        Row("memory per mirror, target", f"{kib['beta']:.0f} KiB"),
        Row("RSS, target, just before its restart (after the full resyncs)", after_resyncs),
        row("GET /status, source (API)", "status_api_s", "< 100 ms", 0.1),
        row("volkeeper status --json (CLI)", "status_cli_s"),
    ]
    return rows, {"no_mirror": bare, "mirrors": full, "create_s": created}


# -- part B: a 16 TiB volume's intent log, with the daemon's classes --------------------------


def contiguous(image_bytes: int) -> bytes:
    """16 extents of 1/1600 of the volume each, evenly spread: 1% marked."""
    extent, stride = image_bytes // 1600, image_bytes // 16
    return b"".join(b"\xff" * extent + bytes(stride - extent) for _ in range(16))


def scattered(image_bytes: int) -> bytes:
    """1% of the regions marked at random (fewer by the few that are drawn twice)."""
    rng = np.random.default_rng(15)
    chunk = min(image_bytes * 8, 1 << 27)  # regions per step: sizes are powers of two
    parts = []
    for _ in range(image_bytes * 8 // chunk):
        bits = np.zeros(chunk, dtype=np.bool_)
        bits[rng.integers(0, chunk, chunk // 100)] = True
        parts.append(np.packbits(bits, bitorder="little").tobytes())
    return b"".join(parts)


def find_runs(bitmap: DirtyBitmap, budget: float) -> tuple[float, int, int, float]:
    """Seconds to walk every run (extrapolated past ``budget``), runs, regions, share walked."""
    runs = regions = 0
    walked, began = 1.0, time.perf_counter()
    for first, count in bitmap.runs():
        runs, regions = runs + 1, regions + count
        if not runs & 0xFFFF and time.perf_counter() - began > budget:
            walked = (first + count) / bitmap.total_regions
            break
    spent = time.perf_counter() - began
    return spent / walked, round(runs / walked), round(regions / walked), walked


def write_log(path: Path, region: int, layout: str, log_id: int) -> list[float]:
    """The log, 1% marked in ``layout``: [bitmap MiB, count() over its bytes s, create s]."""
    image = (contiguous if layout == "contiguous" else scattered)(HUGE // region // 8)
    scan = timed(lambda: image.count(0))
    geometry, generations = Geometry(HUGE, region), Generations(1)
    store = partial(IntentStore.create, path, geometry, generations, mirror="b", log_id=log_id)
    return [
        len(image) / (1 << 20),
        scan,
        timed(lambda: store(all_dirty=False, marked=image).close()),
    ]


def one_case(directory: Path, region: int, layout: str, budget: float) -> dict[str, Any]:
    path, log_id = directory / f"{region}-{layout}.vkil", new_log_id()
    case: dict[str, Any] = {"region": region, "layout": layout}
    case["bitmap_mib"], case["scan_s"], case["create_s"] = write_log(path, region, layout, log_id)
    load = partial(IntentStore.open, path, mirror="b", log_id=log_id, volume_size=HUGE)
    case["open_s"] = timed(lambda: load().close())
    store, case["held_mib"], case["open_peak_mib"] = traced(load)  # opened again, traced
    try:
        walk = find_runs(store.bitmap, budget)
        case |= dict(zip(("runs_s", "runs", "regions", "walked"), walk, strict=True))
        case["first_chunk_s"] = timed(lambda: next(resync_pass(store.bitmap, *RESYNC)))
        if case["walked"] == 1:

            def plan() -> int:  # the chunks of one pass, as Resync.run takes them
                return sum(span is not None for span in resync_pass(store.bitmap, *RESYNC))

            case["pass_s"] = timed(plan)
            case["chunks"], _, case["pass_peak_mib"] = traced(plan)  # run again, traced
    finally:
        store.close()
        path.unlink()
    return case


def case_rows(c: dict[str, Any]) -> list[Row]:
    name = f"16 TiB @ {format_size(c['region'])}, 1% {c['layout']}"
    scan, about = f"count(): {seconds(c['scan_s'])}", "~"[: c["walked"] < 1]
    opened = f"{seconds(c['create_s'])} / {seconds(c['open_s'])}"
    held = f"{c['held_mib']:.1f} MiB (peak {c['open_peak_mib']:.1f} MiB)"
    found = f"{about}{seconds(c['runs_s'])}: {about}{c['regions']:,} regions"
    found += f" in {about}{c['runs']:,} runs"
    first = f"first chunk after {seconds(c['first_chunk_s'])}"
    plan, plan_anchor, plan_ratio = f"{first}; the pass walks as it sends", "", ""
    if "pass_s" in c:
        peak = f"peak {c['pass_peak_mib']:.0f} MiB"
        plan = f"{first}; all {c['chunks']:,} in {seconds(c['pass_s'])}, {peak}"
        plan_anchor, plan_ratio = scan, ratio(c["pass_s"], c["scan_s"])
    return [
        Row(f"{name}: log create / open", opened),
        Row(f"{name}: memory held by the open log", held, f"bitmap {c['bitmap_mib']:.1f} MiB",
            ratio(c["held_mib"], c["bitmap_mib"])),
        Row(f"{name}: find dirty regions, runs()", found, scan, ratio(c["runs_s"], c["scan_s"])),
        Row(f"{name}: plan the pass, resync_pass()", plan, plan_anchor, plan_ratio),
    ]  # fmt: skip


def part_b(
    args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> tuple[list[Row], list[dict[str, Any]]]:
    directory = workdir / "16t"
    directory.mkdir(exist_ok=True)
    rows, cases = [], []
    for region in REGION_SIZES:
        for layout in ("contiguous", "scattered"):
            log(f"B: 16 TiB, {format_size(region)} regions, 1% {layout} ...")
            cases.append(one_case(directory, region, layout, args.budget))
            rows += case_rows(cases[-1])
    return rows, cases


# -- main ----------------------------------------------------------------------------------


def reap_all() -> None:
    for node in _nodes:
        node.stop()
    reap_children()


def markdown(rows: list[Row]) -> str:
    lines = [
        "| measure | value | anchor | ratio | target | pass/fail |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        verdict = "" if r.passed is None else "pass" if r.passed else "**FAIL**"
        cells = (r.measure, r.value, r.anchor, r.ratio, r.target, verdict)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def execute(args: argparse.Namespace, workdir: Path, log: Callable[[str], None]) -> int:
    started = time.monotonic()
    load = [Path("/proc/loadavg").read_text().split()[0]]
    rows_a, raw_a = part_a(args, workdir, log)
    for node in _nodes:
        node.stop()
    rows_b, raw_b = ([], []) if args.skip_16t else part_b(args, workdir, log)
    load.append(Path("/proc/loadavg").read_text().split()[0])
    rows = rows_a + rows_b
    notes = [
        f"load average (1 min) at start {load[0]}, at end {load[1]} on this machine's "
        "cores (shared: other work skews CPU and times)",
        "ratio = value / anchor; part A's anchor is the same node with the same volumes "
        "and no mirror; part B's is bytes.count over the same bitmap bytes",
    ]
    table = markdown(rows) + "\n\n" + "\n".join(f"* {note}" for note in notes)
    log("\n" + table)
    document = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_seconds": time.monotonic() - started,
        "notes": notes,
        "rows": [asdict(row) for row in rows],
        "part_a": raw_a,
        "part_b": raw_b,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    log(f"results: {args.out} (total {time.monotonic() - started:.0f} s)")
    return 1 if args.strict and any(row.passed is False for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4MiB volumes, short idle, 1 start")
    parser.add_argument("--skip-16t", action="store_true", help="part A only")
    parser.add_argument("--budget", type=float, help="seconds per runs() walk (120; quick 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    args.volume_size = parse_size("4MiB" if quick else "16MiB")
    args.starts, args.idle, args.settle = (1, 3.0, 1.0) if quick else (3, 10.0, 2.0)
    args.api, args.cli = (10, 3) if quick else (20, 10)
    args.budget = args.budget or (2.0 if quick else 120.0)

    return run_benchmark(args.workdir, args.keep, "vk-scale-", partial(execute, args), reap_all)


if __name__ == "__main__":
    sys.exit(main())
