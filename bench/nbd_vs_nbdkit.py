"""fio over NBD: volkeeper's NBD server side by side with ``nbdkit file`` on the same file.

How this works: one backing file is created and prefilled with random data (so every block is
allocated and a cold read really reaches the disk).  For each fio job, and ``--repeat`` times,
the two servers take turns -- volkeeper, nbdkit, volkeeper, nbdkit -- each started fresh on
that same file, alone on the machine, driven by the same fio command (``--ioengine=nbd``), then
stopped.  Before each run dirty pages are synced; before a cold-cache run the page cache is
dropped too.  The CPU time each server process used during the fio run is read from
``/proc/PID/stat`` (utime + stime, all threads).  Each metric's median over the repeats goes
into a markdown table of ratios oriented so that **higher is better for volkeeper**
(throughput: volkeeper/nbdkit; latency and CPU: nbdkit/volkeeper); the target is 0.95x.
Every run's raw fio JSON and the summary are written to ``--out``.

Every process it starts (daemon, nbdkit, fio, py-spy) is stopped by PID on the way out,
including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchlib import (  # bench/ is the script's directory, so it is on sys.path
    cpu_seconds,
    reap,
    reap_children,
    run_benchmark,
    spawn,
)
from benchlib import format_number as _number
from benchlib import percentile_us as _percentile_us

from volkeeper.core.units import parse_size
from volkeeper_lab.launcher import LocalNode, VolumeSpec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "nbd_vs_nbdkit.json"
TARGET = 0.95
GIB = 1 << 30


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    fio: tuple[str, ...]
    cold_cache: bool = False


JOBS = (
    Job("seqwrite", "sequential write 1 MiB QD8", ("--rw=write", "--bs=1M", "--iodepth=8")),
    Job("randwrite", "random write 4 KiB QD32", ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    Job(
        "randrw",
        "random 60% write / 40% read 4 KiB QD32, cold cache",
        ("--rw=randrw", "--rwmixwrite=60", "--bs=4k", "--iodepth=32"),
        cold_cache=True,
    ),
    Job(
        "syncwrite",
        "sync write 4 KiB QD1, NBD_CMD_FLUSH after every write (--fsync=1)",
        ("--rw=write", "--bs=4k", "--iodepth=1", "--fsync=1"),
    ),
)
JOB_NAMES = tuple(job.name for job in JOBS)


@dataclass(frozen=True)
class Row:
    key: str  # a key of the per-run metrics dict
    label: str
    higher_is_better: bool
    gated: bool  # compared against TARGET


ROWS: dict[str, tuple[Row, ...]] = {
    "seqwrite": (
        Row("write_mib_s", "write MiB/s", True, True),
        Row("write_clat_p99_us", "write clat p99 (us)", False, False),
    ),
    "randwrite": (
        Row("write_iops", "write IOPS", True, True),
        Row("write_clat_p99_us", "write clat p99 (us)", False, False),
    ),
    "randrw": (
        Row("total_iops", "read+write IOPS", True, True),
        Row("read_iops", "read IOPS", True, True),
        Row("write_iops", "write IOPS", True, True),
        Row("read_clat_p99_us", "read clat p99 (us)", False, False),
    ),
    "syncwrite": (
        Row("write_iops", "write+flush pairs/s", True, True),
        Row("write_clat_p50_us", "write clat p50 (us)", False, True),
        Row("write_clat_p99_us", "write clat p99 (us)", False, False),
        Row("sync_lat_p50_us", "flush lat p50 (us)", False, True),
        Row("sync_lat_p99_us", "flush lat p99 (us)", False, False),
    ),
}
CPU_ROWS = (
    Row("cpu_s_per_gib", "server CPU-s per GiB", False, False),
    Row("cpu_pct", "server CPU % (100 = one core)", False, False),
)

# -- child processes: every one is tracked so that it can be stopped by PID ----------------

_servers: list[Server] = []


def reap_all() -> None:
    for server in _servers:
        with contextlib.suppress(Exception):
            server.stop()
    reap_children()


# -- servers -------------------------------------------------------------------------------


class Server(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def uri(self) -> str: ...
    def pid(self) -> int: ...


class Volkeeper:
    name = "volkeeper"

    def __init__(self, workdir: Path, backing: Path, size: int, io_uring: bool = True) -> None:
        spec = VolumeSpec("data1", size=size, path=backing)
        settings: dict[str, str | int | float] = {} if io_uring else {"io_uring": False}
        self.node = LocalNode(workdir / "volkeeper", "alpha", [spec], node_settings=settings)

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def uri(self) -> str:
        return self.node.uri("data1")

    def pid(self) -> int:
        assert self.node.process is not None
        return self.node.process.pid


class Nbdkit:
    name = "nbdkit"

    def __init__(self, workdir: Path, backing: Path) -> None:
        self.socket = workdir / "nbdkit.sock"
        self.log = workdir / "nbdkit.log"
        self.backing = backing
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = ["nbdkit", "-U", str(self.socket), "--foreground", "--exit-with-parent"]
        with self.log.open("ab") as log:
            self.proc = spawn([*argv, "file", str(self.backing)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited early:\n{self.log.read_text()}")
            if _unix_socket_accepts(self.socket):
                return
            time.sleep(0.02)
        raise TimeoutError("nbdkit did not open its socket within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            reap(self.proc)
            self.proc = None

    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _unix_socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- measurements --------------------------------------------------------------------------


def sync_and_drop_caches(drop: bool) -> str | None:
    """Sync dirty pages; drop the page cache too if asked.  Returns a note if it could not."""
    os.sync()
    if not drop:
        return None
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"page cache not dropped ({exc.strerror}); run as root for a cold-cache read"
    return None


def resident_bytes(path: Path) -> int | None:
    """How much of the file is in the page cache (util-linux fincore), if it can tell."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True
    )
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def run_fio(job: Job, uri: str, runtime: int, output: Path) -> dict[str, Any]:
    argv = [
        "fio",
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        *job.fio,
        "--time_based=1",
        f"--runtime={runtime}",
        "--output-format=json",
        f"--output={output}",
    ]
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=runtime + 60)
    finally:
        reap(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.decode(errors='replace')}")
    text = output.read_text()
    document: dict[str, Any] = json.loads(text[text.index("{") :])
    fio_job: dict[str, Any] = document["jobs"][0]
    if fio_job.get("error"):
        raise RuntimeError(f"fio job {job.name} reported error {fio_job['error']}")
    return fio_job


def metrics(fio_job: dict[str, Any], cpu_s: float) -> dict[str, float | None]:
    """The numbers the report uses, from one fio job and the server's CPU seconds."""
    read, write, sync = fio_job["read"], fio_job["write"], fio_job.get("sync", {})
    seconds = fio_job["job_runtime"] / 1000
    moved = (read["io_bytes"] + write["io_bytes"]) / GIB
    return {
        "write_mib_s": write["bw_bytes"] / (1 << 20),
        "read_mib_s": read["bw_bytes"] / (1 << 20),
        "write_iops": write["iops"],
        "read_iops": read["iops"],
        "total_iops": read["iops"] + write["iops"],
        "write_clat_p50_us": _percentile_us(write, "clat_ns", "50.000000"),
        "write_clat_p99_us": _percentile_us(write, "clat_ns", "99.000000"),
        "read_clat_p50_us": _percentile_us(read, "clat_ns", "50.000000"),
        "read_clat_p99_us": _percentile_us(read, "clat_ns", "99.000000"),
        "sync_lat_p50_us": _percentile_us(sync, "lat_ns", "50.000000"),
        "sync_lat_p99_us": _percentile_us(sync, "lat_ns", "99.000000"),
        "cpu_s": cpu_s,
        "cpu_s_per_gib": cpu_s / moved if moved else None,
        "cpu_pct": 100 * cpu_s / seconds if seconds else None,
        "fio_cpu_pct": fio_job["usr_cpu"] + fio_job["sys_cpu"],
    }


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    backing: Path
    notes: list[str]

    def run_one(self, job: Job, server: Server, repeat: int) -> dict[str, Any]:
        begun = time.monotonic()
        sync_and_drop_caches(False)  # earlier runs' dirty pages must not be written back now
        note = None
        with serving(server):
            if job.cold_cache:
                note = sync_and_drop_caches(self.args.drop_caches)
                if note and note not in self.notes:
                    self.notes.append(note)
            cached = resident_bytes(self.backing)
            pid = server.pid()
            profiler = self.start_profiler(job, server, repeat)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            try:
                fio_out = self.workdir / f"fio-{job.name}-{server.name}-{repeat}.json"
                fio_job = run_fio(job, server.uri(), self.args.runtime, fio_out)
            finally:
                if profiler is not None:
                    reap(profiler, signal.SIGINT, grace=60)  # py-spy writes its file on SIGINT
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
        values = metrics(fio_job, cpu1 - cpu0)
        return {
            "job": job.name,
            "server": server.name,
            "repeat": repeat,
            "wall_s": time.monotonic() - begun,  # with sync, start and stop
            "fio_wall_s": t1 - t0,
            "cached_bytes_at_start": cached,
            "note": note,
            "metrics": values,
            "fio": fio_job,
        }

    def start_profiler(
        self, job: Job, server: Server, repeat: int
    ) -> subprocess.Popen[bytes] | None:
        if not self.args.py_spy or server.name != "volkeeper":
            return None
        out = Path(self.args.py_spy) / f"{job.name}-{repeat}.folded.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [py_spy_path(), "record", "--pid", str(server.pid()), "--threads", "--idle"]
        argv += ["--format", "raw", "-o", str(out), "--rate", "250"]
        return spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- report --------------------------------------------------------------------------------


def median_metrics(runs: list[dict[str, Any]], job: str, server: str) -> dict[str, float]:
    mine = [run["metrics"] for run in runs if run["job"] == job and run["server"] == server]
    keys = {key for values in mine for key in values}
    out = {}
    for key in sorted(keys):
        values = [m[key] for m in mine if m.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def summarise(runs: list[dict[str, Any]], jobs: list[Job]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        vk = median_metrics(runs, job.name, "volkeeper")
        nk = median_metrics(runs, job.name, "nbdkit")
        for row in (*ROWS[job.name], *CPU_ROWS):
            a, b = vk.get(row.key), nk.get(row.key)
            ratio = None
            if a is not None and b is not None and a > 0 and b > 0:
                ratio = a / b if row.higher_is_better else b / a
            passed = None if not row.gated or ratio is None else ratio >= TARGET
            rows.append(
                {
                    "job": job.name,
                    "metric": row.label,
                    "key": row.key,
                    "volkeeper": a,
                    "nbdkit": b,
                    "ratio": ratio,
                    "higher_is_better": row.higher_is_better,
                    "target": TARGET if row.gated else None,
                    "pass": passed,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| job | metric | volkeeper | nbdkit | ratio (>1: volkeeper better) | target | pass/fail |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        target = "info" if row["target"] is None else f">= {row['target']:.2f}x"
        verdict = {None: "", True: "pass", False: "**FAIL**"}[row["pass"]]
        cells = [row["job"], row["metric"], _number(row["volkeeper"]), _number(row["nbdkit"])]
        lines.append("| " + " | ".join([*cells, ratio, target, verdict]) + " |")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            return (
                subprocess.run(argv, capture_output=True, text=True).stdout.strip().split("\n")[0]
            )
        except OSError:
            return "?"

    return {
        "fio": first_line(["fio", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }


# -- main ----------------------------------------------------------------------------------


def py_spy_path() -> str:
    """py-spy from the venv this script runs in, else from PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy") or "py-spy"


def prefill(path: Path, size: int) -> None:
    """Write random data over the whole file and fsync it: every block allocated."""
    argv = ["fio", "--name=prefill", "--ioengine=psync", "--rw=write", "--bs=1M"]
    argv += [f"--filename={path}", f"--size={size}", "--refill_buffers=1", "--end_fsync=1"]
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        reap(proc)
    if proc.returncode != 0 or path.stat().st_size != size:
        raise RuntimeError(f"prefill failed: {err.decode(errors='replace')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", help="backing file size (default 1GiB; --quick: 256MiB)")
    parser.add_argument("--runtime", type=int, default=20, help="seconds per fio run (20)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per server per job (2)")
    parser.add_argument("--jobs", default=",".join(JOB_NAMES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="smoke: 5 s, 256MiB, 1 repeat")
    parser.add_argument(
        "--no-io-uring", action="store_true", help="volkeeper reads cache misses on threads"
    )
    parser.add_argument("--workdir", type=Path, help="where the backing file goes (temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-drop-caches", dest="drop_caches", action="store_false", help="skip drop_caches"
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="profile every volkeeper run with py-spy into DIR (slows volkeeper down)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.runtime, args.repeat = 5, 1
    args.size = args.size or ("256MiB" if args.quick else "1GiB")
    names = [name.strip() for name in args.jobs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(JOB_NAMES))
    if unknown:
        parser.error(f"unknown job(s) {unknown}; choose from {', '.join(JOB_NAMES)}")
    args.job_list = [job for job in JOBS if job.name in names]
    if args.py_spy and shutil.which(py_spy_path()) is None:
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make deps installs fio and nbdkit)")
    return args


def execute(args: argparse.Namespace, workdir: Path, log: Callable[[str], None]) -> int:
    started = time.monotonic()
    size = parse_size(args.size)
    backing = workdir / "backing.img"
    bench = Bench(args, workdir, backing, [])
    if args.drop_caches and os.geteuid() != 0:
        bench.notes.append("not root: the cold-cache job runs with a warm page cache")
        args.drop_caches = False
    if args.py_spy:
        bench.notes.append("volkeeper ran under py-spy: its numbers are not representative")
    runs_total = len(args.job_list) * 2 * args.repeat
    log(
        f"# volkeeper vs nbdkit: {len(args.job_list)} jobs x 2 servers x {args.repeat} repeats "
        f"x {args.runtime} s = ~{runs_total * args.runtime / 60:.1f} min of fio, size {args.size}"
    )
    log(f"prefilling {backing} with random data ...")
    prefill(backing, size)
    servers: list[Server] = [
        Volkeeper(workdir, backing, size, io_uring=not args.no_io_uring),
        Nbdkit(workdir, backing),
    ]
    _servers.extend(servers)
    runs = [
        run_and_log(bench, job, server, repeat, log)
        for job, repeat, server in schedule(args, servers)
    ]
    rows = summarise(runs, args.job_list)
    report(args, rows, bench.notes, log)
    document = {
        "args": {k: str(v) for k, v in vars(args).items() if k != "job_list"},
        "environment": environment(),
        "wall_seconds": time.monotonic() - started,
        "notes": bench.notes,
        "summary": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    log(f"results: {args.out} (total {time.monotonic() - started:.0f} s)")
    failed = [row for row in rows if row["pass"] is False]
    return 1 if failed and args.strict else 0


def schedule(args: argparse.Namespace, servers: list[Server]) -> Iterator[tuple[Job, int, Server]]:
    """Job by job; within a job the servers alternate: A, B, A, B, ..."""
    for job in args.job_list:
        for repeat in range(args.repeat):
            for server in servers:
                yield job, repeat, server


def run_and_log(
    bench: Bench, job: Job, server: Server, repeat: int, log: Callable[[str], None]
) -> dict[str, Any]:
    run = bench.run_one(job, server, repeat)
    m = run["metrics"]
    log(
        f"  {job.name:<9} {server.name:<9} #{repeat}: {m['total_iops']:>9,.0f} IOPS"
        f" {m['write_mib_s'] + m['read_mib_s']:>8.1f} MiB/s  server CPU {m['cpu_s']:.1f} s"
        f"  ({run['wall_s']:.0f} s with start/stop)"
    )
    return run


def report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    notes: list[str],
    log: Callable[[str], None],
) -> None:
    log("")
    for job in args.job_list:
        log(f"- {job.name}: {job.title}")
    log("")
    log(markdown(rows))
    log("")
    log("ratio: throughput/IOPS = volkeeper/nbdkit; latency and CPU = nbdkit/volkeeper.")
    log(f"Medians of {args.repeat} run(s) per server. Target {TARGET}x on gated rows.")
    for note in notes:
        log(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        args.workdir, args.keep, "volkeeper-bench-",
        lambda workdir, say: execute(args, workdir, say), reap_all,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
