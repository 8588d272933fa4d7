"""Cost of mirroring: fio over NBD, unmirrored vs async and sync mirrors; partial resync vs rsync.

How this works, in one run:

1. Loopback round trip: a Python TCP ping-pong over 127.0.0.1 (an echo server in a child
   process, TCP_NODELAY, median of ``--rtt-samples``), the yardstick for the 4 KiB sync-write
   latency target (mirrored p50 <= unmirrored p50 + 3 RTT).
2. fio over NBD (``--ioengine=nbd``) against three setups of the same size, every file
   prefilled with random data: an **unmirrored** volume (node ``solo``, no job), the source of
   an **async mirror** and the source of a **sync mirror** (each ``alpha:data1 -> beta:data1``,
   a pair of daemons of its own on this machine, job ``bench-async`` with ``--queue-limit``,
   job ``bench-sync``).  One pair per mode: each mirror is created once (full resync), and
   no run pays for a job being re-created.  Like every server here, a pair is started fresh
   for each run, and a run starts only once its mirror is ``Mirroring``.  For each job and
   ``--repeat`` the three take turns (unmirrored, async, sync, unmirrored, ...).  After fio
   ends, the run waits until the mirror is ``Mirroring`` with ``queue_bytes`` == 0: that
   **drain** time is part of async's cost (a sync mirror has nothing left).  The CPU time of
   every daemon (utime + stime from ``/proc/PID/stat``, summed over alpha and beta) is read
   before fio and after the drain (CPU-s per GiB) and when fio ends (CPU %).  Whether the
   mirror left ``Mirroring`` during a run (async: queue overflow -> ``Resyncing``) comes from
   its state before and after, its state changes in the source's log, and
   ``volkeeper_mirror_queue_overflows_total`` from ``/metrics`` before and after.  Ratios are
   async / unmirrored and sync / unmirrored.
3. Partial resync against rsync: a sync mirror (``--resync-size``, 4 GiB by default: the
   issue's case) is ``Mirroring``; the target stops; its backing file is copied aside twice
   (its pre-change data); ``fio randwrite`` changes ``--resync-fraction`` of the 4 KiB blocks
   of the source through NBD (each block once, offsets logged with ``--write_iolog``); the
   target starts again and the partial resync is timed from the source's log (``Resyncing``
   -> ``Mirroring``) and from outside.  Then both daemons stop, the volumes are compared
   (sha256), and the anchors run on the same files: ``rsync --inplace --no-whole-file`` of
   the source file onto the first copy (plus ``--ignore-times``, so that its size+mtime quick
   check cannot skip the file), and a Python copy of just the changed blocks (offsets known
   from fio's log, then fdatasync) onto the second.  Both copies are checked against the
   source afterwards.

Every process it starts (daemons, fio, rsync, echo server, py-spy) is stopped by PID on the
way out, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from benchlib import (  # bench/ is the script's directory, so it is on sys.path
    CLK_TCK,
    cpu_seconds,
    reap,
    reap_children,
    run_benchmark,
    spawn,
)
from benchlib import format_number as _number
from benchlib import percentile_us as _percentile_us

from volkeeper.core.units import format_size, parse_size
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port, trust_each_other

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "mirror_overhead.json"
GIB = 1 << 30
BLOCK = 4096
THROUGHPUT_TARGET = 0.55  # mirrored / unmirrored, at least (async and sync each)
CPU_TARGET = 2.0  # mirrored / unmirrored CPU-s per GiB written, at most (async and sync each)
RTT_BUDGET = 3  # mirrored p50 <= unmirrored p50 + this many loopback round trips
RESYNC_TARGET = 20.0  # rsync time / partial resync time, at least
RESYNC_BYTES_TARGET = 1.1  # bytes sent by the partial resync / marked bytes, at most
MODES = ("async", "sync")  # the mirrored setups, in the order they take their turns
DEFAULT_QUEUE_LIMIT = "64MiB"  # the API's default
Log = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    fio: tuple[str, ...]


JOBS = (
    Job("seqwrite", "sequential write 1 MiB QD8", ("--rw=write", "--bs=1M", "--iodepth=8")),
    Job("randwrite", "random write 4 KiB QD32", ("--rw=randwrite", "--bs=4k", "--iodepth=32")),
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
    kind: str  # "throughput" (>= THROUGHPUT_TARGET), "cpu" (<= CPU_TARGET), "latency" (+3 RTT)
    gated: bool


ROWS: dict[str, tuple[Row, ...]] = {
    "seqwrite": (
        Row("write_mib_s", "write MiB/s", "throughput", True),
        Row("write_clat_p50_us", "write clat p50 (us)", "latency", False),
        Row("write_clat_p99_us", "write clat p99 (us)", "latency", False),
        Row("cpu_s_per_gib", "daemons' CPU-s per GiB written", "cpu", True),
    ),
    "randwrite": (
        Row("write_iops", "write IOPS", "throughput", False),
        Row("write_clat_p50_us", "write clat p50 (us)", "latency", False),
        Row("write_clat_p99_us", "write clat p99 (us)", "latency", False),
        Row("cpu_s_per_gib", "daemons' CPU-s per GiB written", "cpu", False),
    ),
    "syncwrite": (
        Row("write_iops", "write+flush pairs/s", "throughput", False),
        Row("write_clat_p50_us", "write clat p50 (us)", "latency", True),
        Row("write_clat_p99_us", "write clat p99 (us)", "latency", False),
        Row("sync_lat_p50_us", "flush lat p50 (us)", "latency", False),
        Row("sync_lat_p99_us", "flush lat p99 (us)", "latency", False),
        Row("cpu_s_per_gib", "daemons' CPU-s per GiB written", "cpu", False),
    ),
}
CPU_PCT_ROW = Row("cpu_pct", "daemons' CPU % (100 = one core)", "cpu", False)

# -- child processes: every one is tracked so that it can be stopped by PID ----------------

_nodes: list[LocalNode] = []
_starting: list[threading.Thread] = []  # node starts running in a helper thread


def run_child(argv: list[str], timeout: float) -> tuple[int, str, str]:
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def reap_all() -> None:
    for thread in _starting:  # a start in progress ends (ready or failed) within its timeout
        thread.join(30)
    for node in _nodes:  # LocalNode.stop: SIGTERM by PID, SIGKILL after a grace period
        with contextlib.suppress(Exception):
            node.stop(timeout=10)
    reap_children()


# -- loopback round trip -------------------------------------------------------------------

ECHO_SERVER = r"""
import socket, struct, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf
while True:
    ask, answer = struct.unpack("!II", exact(8))
    exact(ask)
    conn.sendall(bytes(answer))
"""


def _recv_exact(sock: socket.socket, n: int) -> None:
    view = memoryview(bytearray(n))
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if not count:
            raise ConnectionError("echo server went away")
        got += count


def loopback_rtt(samples: int) -> dict[str, Any]:
    """Median round trip of a Python TCP ping-pong over 127.0.0.1 (two processes)."""
    server = spawn([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            shapes = {"tiny": (8, 8), "write_4k": (BLOCK, 32)}  # request bytes, reply bytes
            result: dict[str, Any] = {"samples": samples}
            for name, (ask, answer) in shapes.items():
                message = struct.pack("!II", ask, answer) + bytes(ask)
                times = []
                for i in range(samples + samples // 10):
                    t0 = time.perf_counter_ns()
                    sock.sendall(message)
                    _recv_exact(sock, answer)
                    if i >= samples // 10:  # the first tenth warms up
                        times.append((time.perf_counter_ns() - t0) / 1000)
                times.sort()
                result[name] = {
                    "p50_us": statistics.median(times),
                    "p10_us": times[len(times) // 10],
                    "p90_us": times[len(times) * 9 // 10],
                }
            return result
    finally:
        reap(server)


# -- nodes ---------------------------------------------------------------------------------


def start_node(node: LocalNode) -> None:
    if node not in _nodes:
        _nodes.append(node)
    node.start()


def start_nodes(first: LocalNode, second: LocalNode) -> None:
    """Start two daemons at once (each spends ~1.5 s importing): ``first`` in a thread."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start_node(first)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"start-{first.name}", daemon=True)
    _starting.append(thread)
    thread.start()
    try:
        start_node(second)
    finally:
        thread.join()
        _starting.remove(thread)
    if errors:
        raise errors[0]


def pid_of(node: LocalNode) -> int:
    assert node.process is not None
    return node.process.pid


def mirror_view(node: LocalNode) -> dict[str, Any]:
    mirrors: list[dict[str, Any]] = node.status()["mirrors"]  # type: ignore[assignment]
    return mirrors[0]


def wait_state(node: LocalNode, state: str, timeout: float, poll: float = 0.02) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = mirror_view(node)
        if view["state"] == state:
            return view
        if time.monotonic() > deadline:
            raise TimeoutError(f"mirror not {state} after {timeout:.0f} s: {view}")
        time.sleep(poll)


def create_job(alpha: LocalNode, name: str, mode: str, queue_limit: str) -> None:
    body = {"name": name, "source": "alpha:data1", "target": "beta:data1", "mode": mode}
    if mode == "async":
        body["queue_limit"] = queue_limit
    with alpha.api() as api:
        reply = api.post("/jobs", json={**body, "confirm": True})
    if reply.status_code != 201:
        raise RuntimeError(f"POST /jobs ({mode}) failed: {reply.status_code} {reply.text}")


_OVERFLOWS = re.compile(r"^volkeeper_mirror_queue_overflows_total\{([^}]*)\} (\S+)$", re.M)


def overflow_count(node: LocalNode, job: str) -> int:
    """``volkeeper_mirror_queue_overflows_total`` of ``job`` (a counter since daemon start)."""
    with node.api() as api:
        text = api.get("/metrics").text
    for labels, value in _OVERFLOWS.findall(text):
        if f'job="{job}"' in labels:
            return int(float(value))
    raise RuntimeError(f"no volkeeper_mirror_queue_overflows_total for job {job} in /metrics")


_STATE_LINE = re.compile(r"timestamp='([^']+)'.*event='mirror state'.* state='([^']+)'")


def state_times(log_text: str) -> list[tuple[float, str]]:
    """(unix time, state) of every mirror state change in a daemon log."""
    out = []
    for match in _STATE_LINE.finditer(log_text):
        when = datetime.datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        out.append((when.timestamp(), match.group(2)))
    return out


def resync_seconds(log_text: str) -> float | None:
    """From the first ``Resyncing`` to the next ``Mirroring`` in (a slice of) a source's log."""
    began = None
    for when, state in state_times(log_text):
        if state == "Resyncing" and began is None:
            began = when
        elif state == "Mirroring" and began is not None:
            return when - began
    return None


class Pair:
    """alpha:data1 -> beta:data1, a mirror (``mode`` sync or async) between two daemons on
    this machine, in a directory of its own."""

    def __init__(
        self,
        directory: Path,
        size: int,
        source_file: Path,
        mode: str = "sync",
        queue_limit: str = DEFAULT_QUEUE_LIMIT,
        tls: bool = False,
    ) -> None:
        # Plain TCP links (insecure peers), as every earlier run measured, or with ``tls``
        # the default link: TLS 1.3 between pinned identities.  The target lists its
        # source, as a target must.
        alpha_port = free_tcp_port()
        self.beta = LocalNode(
            directory / "beta", "beta", [VolumeSpec("data1", size=size)],
            peers={"alpha": alpha_port}, secure=tls,
        )  # fmt: skip
        spec = VolumeSpec("data1", size=size, path=source_file)
        self.alpha = LocalNode(
            directory / "alpha", "alpha", [spec], peers={"beta": self.beta.peer_port},
            peer_port=alpha_port, secure=tls,
        )  # fmt: skip
        if tls:
            trust_each_other(self.alpha, self.beta)
        self.size = size
        self.mode = mode
        self.name = mode  # the setup's name in runs, tables and file names
        self.job = f"bench-{mode}"
        self.queue_limit = queue_limit

    @property
    def target_file(self) -> Path:
        return self.beta.volume_path(self.beta.volumes[0])

    @property
    def source_file(self) -> Path:
        return self.alpha.volume_path(self.alpha.volumes[0])

    @property
    def settle_timeout(self) -> float:
        """Long enough for a resync of the whole volume at 10 MiB/s, and then some."""
        return self.size / (10 << 20) + 60

    def create(self, keep_running: bool = False) -> dict[str, Any]:
        """Start both, create the job, wait for the full resync; returns what it took."""
        start_nodes(self.beta, self.alpha)
        t0 = time.monotonic()
        create_job(self.alpha, self.job, self.mode, self.queue_limit)
        view = wait_state(self.alpha, "Mirroring", timeout=self.settle_timeout, poll=0.1)
        wall = time.monotonic() - t0
        seconds = resync_seconds(self.alpha.log_text()) or wall
        if view["mode"] != self.mode:
            raise RuntimeError(f"asked for a {self.mode} mirror, got {view['mode']!r}: {view}")
        if not keep_running:
            self.stop()
        return {
            "mode": self.mode,
            "queue_limit_bytes": view.get("queue_limit_bytes"),
            "bytes": view["sent_bytes"],
            "seconds": seconds,
            "mib_s": view["sent_bytes"] / (1 << 20) / seconds,
        }

    def start(self) -> dict[str, Any]:
        start_nodes(self.beta, self.alpha)
        return wait_state(self.alpha, "Mirroring", timeout=self.settle_timeout)

    def wait_drained(
        self, api: httpx.Client, since: float, poll: float = 0.01
    ) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        """Poll (through ``api``, a client opened beforehand: its setup is not timed) until
        the mirror is ``Mirroring`` with an empty queue.  Returns the seconds from ``since``
        (None: not within ``settle_timeout``), the first view and the last."""
        deadline = since + self.settle_timeout
        first: dict[str, Any] | None = None
        while True:
            view: dict[str, Any] = api.get("/status").json()["mirrors"][0]
            first = first or view
            if view["state"] == "Mirroring" and view["queue_bytes"] == 0:
                return time.monotonic() - since, first, view
            if time.monotonic() > deadline:
                return None, first, view
            time.sleep(poll)

    def stop(self) -> None:
        self.alpha.stop()
        self.beta.stop()

    def pids(self) -> dict[str, int]:
        return {"alpha": pid_of(self.alpha), "beta": pid_of(self.beta)}

    def uri(self) -> str:
        return self.alpha.uri("data1")


class Solo:
    """One daemon, one volume, no job: the unmirrored baseline."""

    name = "unmirrored"

    def __init__(self, directory: Path, size: int, backing: Path) -> None:
        self.node = LocalNode(directory / "solo", "solo", [VolumeSpec("data1", size, path=backing)])

    def start(self) -> dict[str, Any]:
        start_node(self.node)
        return {}

    def stop(self) -> None:
        self.node.stop()

    def pids(self) -> dict[str, int]:
        return {"solo": pid_of(self.node)}

    def uri(self) -> str:
        return self.node.uri("data1")


# -- measurements --------------------------------------------------------------------------


def run_fio(name: str, uri: str, extra: list[str], output: Path, timeout: float) -> dict[str, Any]:
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", *extra]
    argv += ["--output-format=json", f"--output={output}"]
    code, _, err = run_child(argv, timeout)
    if code != 0:
        raise RuntimeError(f"fio failed ({code}): {err}")
    text = output.read_text()
    document: dict[str, Any] = json.loads(text[text.index("{") :])
    fio_job: dict[str, Any] = document["jobs"][0]
    if fio_job.get("error"):
        raise RuntimeError(f"fio job {name} reported error {fio_job['error']}")
    return fio_job


def metrics(
    fio_job: dict[str, Any], cpu_fio: dict[str, float], cpu: dict[str, float]
) -> dict[str, float | None]:
    """fio's numbers and the daemons' CPU: ``cpu`` from fio's start until the mirror has
    drained (per GiB: what the writes cost in all), ``cpu_fio`` while fio ran (CPU %)."""
    write, sync = fio_job["write"], fio_job.get("sync", {})
    seconds = fio_job["job_runtime"] / 1000
    written = write["io_bytes"] / GIB
    cpu_s, cpu_s_fio = sum(cpu.values()), sum(cpu_fio.values())
    return {
        "write_mib_s": write["bw_bytes"] / (1 << 20),
        "write_iops": write["iops"],
        "write_clat_p50_us": _percentile_us(write, "clat_ns", "50.000000"),
        "write_clat_p99_us": _percentile_us(write, "clat_ns", "99.000000"),
        "sync_lat_p50_us": _percentile_us(sync, "lat_ns", "50.000000"),
        "sync_lat_p99_us": _percentile_us(sync, "lat_ns", "99.000000"),
        "written_bytes": write["io_bytes"],
        "cpu_s": cpu_s,
        **{f"cpu_s_{name}": value for name, value in cpu.items()},
        "cpu_s_per_gib": cpu_s / written if written else None,
        "cpu_s_during_fio": cpu_s_fio,
        "cpu_pct": 100 * cpu_s_fio / seconds if seconds else None,
        "fio_cpu_pct": fio_job["usr_cpu"] + fio_job["sys_cpu"],
    }


def py_spy_path() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy") or "py-spy"


def prefill(path: Path, size: int) -> None:
    """Random data over the whole file, fsynced: every block allocated."""
    argv = ["fio", "--name=prefill", "--ioengine=psync", "--rw=write", "--bs=1M"]
    argv += [f"--filename={path}", f"--size={size}", "--refill_buffers=1", "--end_fsync=1"]
    code, _, err = run_child(argv, timeout=900)
    if code != 0 or path.stat().st_size != size:
        raise RuntimeError(f"prefill of {path} failed: {err}")


def busy_cores(seconds: float = 1.0) -> float:
    """CPU in use on the whole machine, in cores, over a short sample (/proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def hungry_processes(seconds: float = 1.0, threshold: float = 0.2) -> list[str]:
    """Other processes using more than ``threshold`` of a core right now (pid, share, argv)."""

    def ticks() -> dict[int, int]:
        out = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    out[int(entry.name)] = int(fields[11]) + int(fields[12])
        return out

    before = ticks()
    time.sleep(seconds)
    after = ticks()
    found = []
    for pid, used in after.items():
        share = (used - before.get(pid, used)) / CLK_TCK / seconds
        if share > threshold:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"pid {pid} at {100 * share:.0f}% of a core: {argv[:160]}")
    return found


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# -- part 2: fio, unmirrored vs async and sync mirrors --------------------------------------

SETUPS = ("unmirrored", *MODES)


@dataclass
class FioBench:
    args: argparse.Namespace
    workdir: Path
    notes: list[str]

    def run_one(self, job: Job, server: Solo | Pair, repeat: int) -> dict[str, Any]:
        begun = time.monotonic()
        os.sync()  # earlier runs' dirty pages must not be written back during this one
        server.start()  # a pair: its mirror is Mirroring
        pair = server if isinstance(server, Pair) else None
        mirror: dict[str, Any] = {}
        api = pair.alpha.api() if pair is not None else None  # open before fio: not timed
        try:
            if pair is not None and api is not None:
                before = api.get("/status").json()["mirrors"][0]
                overflows0 = overflow_count(pair.alpha, pair.job)
                log_mark = len(pair.alpha.log_text())
            pids = server.pids()
            profilers = self.start_profilers(job, server, repeat)
            try:
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                out = self.workdir / f"fio-{job.name}-{server.name}-{repeat}.json"
                extra = [*job.fio, "--time_based=1", f"--runtime={self.args.runtime}"]
                fio_job = run_fio(job.name, server.uri(), extra, out, self.args.runtime + 60)
                fio_ended = time.monotonic()
                cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                if pair is not None and api is not None:  # what fio left, how long it ships
                    drain_s, at_end, settled = pair.wait_drained(api, fio_ended)
                cpu2 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            finally:
                for profiler in profilers:
                    reap(profiler, signal.SIGINT, grace=60)  # py-spy writes its file on SIGINT
            if pair is not None:
                states = [state for _, state in state_times(pair.alpha.log_text()[log_mark:])]
                overflows = overflow_count(pair.alpha, pair.job) - overflows0
                mirror = {
                    "mode": pair.mode,
                    "state_before": before["state"],
                    "state_at_fio_end": at_end["state"],
                    "queue_bytes_at_fio_end": at_end["queue_bytes"],
                    "lag_s_at_fio_end": at_end["lag_s"],
                    "out_of_sync_bytes_at_fio_end": at_end["out_of_sync_bytes"],
                    "drain_s": drain_s,
                    "state_after_drain": settled["state"],
                    "queue_overflows": overflows,
                    "states_seen": states,  # state changes in the source's log, fio + drain
                    "times_left_mirroring": sum(
                        state != "Mirroring" and was == "Mirroring"
                        for was, state in zip(["Mirroring", *states], states, strict=False)
                    ),
                    "left_mirroring": bool(overflows)
                    or at_end["state"] != "Mirroring"
                    or any(state != "Mirroring" for state in states),
                    "view_after": settled,
                }
        finally:
            if api is not None:
                api.close()
            server.stop()
        cpu_fio = {name: cpu1[name] - cpu0[name] for name in pids}
        cpu = {name: cpu2[name] - cpu0[name] for name in pids}
        run: dict[str, Any] = {
            "job": job.name,
            "server": server.name,
            "repeat": repeat,
            "wall_s": time.monotonic() - begun,
            "metrics": metrics(fio_job, cpu_fio, cpu),
            "fio": fio_job,
        }
        if pair is not None:
            run["mirror"] = mirror
            run["replicated_bytes"] = settled["sent_bytes"] - before["sent_bytes"]
            self.check_mirror(job, pair, repeat, mirror)
        return run

    def check_mirror(self, job: Job, pair: Pair, repeat: int, mirror: dict[str, Any]) -> None:
        """Notes on a run whose mirror did not simply stay Mirroring."""
        where = f"{job.name} {pair.mode} #{repeat}"
        error = mirror["view_after"].get("last_error")
        if mirror["drain_s"] is None:
            self.notes.append(
                f"{where}: the mirror had not drained {pair.settle_timeout:.0f} s after fio "
                f"(state {mirror['state_after_drain']!r}, last_error {error!r}): drain and "
                "CPU of that run are incomplete"
            )
        if not mirror["left_mirroring"]:
            return
        others = sorted(set(mirror["states_seen"]) - {"Mirroring", "Resyncing"})
        if pair.mode == "async" and mirror["queue_overflows"] and not others:
            self.notes.append(
                f"{where}: the async queue overflowed ({mirror['queue_overflows']} writes "
                "tracked instead of sent): Mirroring -> Resyncing -> Mirroring "
                f"{mirror['times_left_mirroring']} times; the drain includes the last resync"
            )
            return
        self.notes.append(
            f"{where}: the mirror left Mirroring ({' -> '.join(mirror['states_seen']) or '?'}, "
            f"{mirror['queue_overflows']} queue overflows, last_error {error!r}): that run's "
            "numbers are suspect"
        )

    def start_profilers(
        self, job: Job, server: Solo | Pair, repeat: int
    ) -> list[subprocess.Popen[bytes]]:
        if not self.args.py_spy:
            return []
        procs = []
        for name, pid in server.pids().items():
            out = Path(self.args.py_spy) / f"{job.name}-{server.name}-{name}-{repeat}.folded.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                py_spy_path(),
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--idle",
                "--nonblocking",
            ]
            argv += ["--format", "raw", "-o", str(out), "--rate", "250"]
            procs.append(spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs


def fio_part(args: argparse.Namespace, workdir: Path, notes: list[str], log: Log) -> dict[str, Any]:
    size = parse_size(args.size)
    files = {setup: workdir / f"{setup}.img" for setup in SETUPS}
    log(f"prefilling {format_size(size)} x {len(files)} (unmirrored volume, mirror sources) ...")
    for path in files.values():
        prefill(path, size)
    solo = Solo(workdir, size, files["unmirrored"])
    pairs = [
        Pair(workdir / mode, size, files[mode], mode, args.queue_limit, tls=args.tls)
        for mode in MODES
    ]
    creations = {}
    for pair in pairs:
        queue = f", queue limit {args.queue_limit}" if pair.mode == "async" else ""
        log(
            f"creating the {pair.mode} mirror alpha:data1 -> beta:data1 "
            f"(job {pair.job}{queue}; full resync) ..."
        )
        creation = creations[pair.mode] = pair.create()
        log(
            f"  full resync: {format_size(creation['bytes'])} in {creation['seconds']:.1f} s "
            f"({creation['mib_s']:.0f} MiB/s)"
        )
    bench = FioBench(args, workdir, notes)
    setups: list[Solo | Pair] = [solo, *pairs]  # the order of SETUPS
    runs = []
    for job in args.job_list:
        for repeat in range(args.repeat):
            for server in setups:
                run = bench.run_one(job, server, repeat)
                log_run(run, log)
                runs.append(run)
    return {"full_resync": creations, "runs": runs}


def log_run(run: dict[str, Any], log: Log) -> None:
    m = run["metrics"]
    split = ", ".join(
        f"{key[6:]} {m[key]:.1f}"
        for key in m
        if key.startswith("cpu_s_") and key[6:] not in ("per_gib", "during_fio")
    )
    line = (
        f"  {run['job']:<9} {run['server']:<10} #{run['repeat']}: {m['write_iops']:>9,.0f} IOPS"
        f" {m['write_mib_s']:>8.1f} MiB/s  CPU {m['cpu_s']:.1f} s ({split})"
    )
    if "replicated_bytes" in run:
        ratio = run["replicated_bytes"] / max(m["written_bytes"], 1)
        mirror = run["mirror"]
        drain = "timeout" if mirror["drain_s"] is None else _secs(mirror["drain_s"])
        line += f"  replicated/written {ratio:.2f}  drain {drain}"
        if mirror["left_mirroring"]:
            line += (
                f"  LEFT Mirroring {mirror['times_left_mirroring']} times"
                f" ({mirror['queue_overflows']} overflows)"
            )
    log(line + f"  [{run['wall_s']:.0f} s]")


def median_metrics(runs: list[dict[str, Any]], job: str, server: str) -> dict[str, float]:
    mine = [run["metrics"] for run in runs if run["job"] == job and run["server"] == server]
    out = {}
    for key in {key for values in mine for key in values}:
        values = [m[key] for m in mine if m.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def judge(row: Row, unmirrored: float, mirrored: float, rtt_us: float) -> tuple[str, bool | None]:
    """The target text and the verdict of one row for one mode (None: info only)."""
    if row.kind == "throughput":
        text, ok = f">= {THROUGHPUT_TARGET:.2f}x", mirrored / unmirrored >= THROUGHPUT_TARGET
    elif row.kind == "cpu":
        text, ok = f"<= {CPU_TARGET:.1f}x", mirrored / unmirrored <= CPU_TARGET
    else:
        limit = unmirrored + RTT_BUDGET * rtt_us
        text, ok = f"<= {_number(limit)} us (+{RTT_BUDGET} RTT)", mirrored <= limit
    if not row.gated:
        return f"info ({text})", None
    return text, ok


def summarise(runs: list[dict[str, Any]], jobs: list[Job], rtt_us: float) -> list[dict[str, Any]]:
    """One row per job and metric: medians of every setup, both ratios, both verdicts."""
    rows = []
    for job in jobs:
        medians = {setup: median_metrics(runs, job.name, setup) for setup in SETUPS}
        for row in (*ROWS[job.name], CPU_PCT_ROW):
            u = medians["unmirrored"].get(row.key)
            entry: dict[str, Any] = {
                "job": job.name,
                "metric": row.label,
                "key": row.key,
                "unmirrored": u,
                "target": "info",
            }
            for mode in MODES:
                m = medians[mode].get(row.key)
                ratio, passed = None, None
                if u and m:
                    ratio = m / u
                    target, passed = judge(row, u, m, rtt_us)
                    if row is not CPU_PCT_ROW:
                        entry["target"] = target  # the same for both modes
                entry.update({mode: m, f"ratio_{mode}": ratio, f"pass_{mode}": passed})
            rows.append(entry)
        rows.extend(mirror_rows(runs, job.name))
    return rows


def mirror_rows(runs: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    """Rows only a mirror has: drain time, queue at fio's end, runs that left Mirroring."""
    drain: dict[str, Any] = {"metric": "drain: fio end -> Mirroring with queue 0"}
    queue: dict[str, Any] = {"metric": "queue / lag when fio ended"}
    left: dict[str, Any] = {"metric": "runs that left Mirroring (times; queue overflows)"}
    for mode in MODES:
        mine = [run["mirror"] for run in runs if run["job"] == job and run["server"] == mode]
        if not mine:
            continue
        drains = [m["drain_s"] for m in mine]
        known = [d for d in drains if d is not None]
        drain[mode] = statistics.median(known) if known else None
        drain[f"display_{mode}"] = _secs(drain[mode])
        if len(known) < len(drains):
            drain[f"display_{mode}"] += f" ({len(drains) - len(known)} timed out)"
        queue_mib = statistics.median(m["queue_bytes_at_fio_end"] for m in mine) / (1 << 20)
        lag_s = statistics.median(m["lag_s_at_fio_end"] for m in mine)
        queue[mode] = queue_mib
        queue[f"display_{mode}"] = f"{_number(queue_mib)} MiB, {_secs(lag_s)}"
        count = sum(bool(m["left_mirroring"]) for m in mine)
        times = sum(m["times_left_mirroring"] for m in mine)
        overflows = sum(m["queue_overflows"] for m in mine)
        left[mode] = count
        left[f"display_{mode}"] = f"{count} of {len(mine)} ({times}; {overflows:,})"
    drain["target"] = "info (part of async's cost)"
    queue["target"] = left["target"] = "info"
    out = []
    for entry in (drain, queue, left):
        entry.update(job=job, key=None, unmirrored=None, display_unmirrored="-")
        for mode in MODES:
            entry.setdefault(mode, None)
            entry.update({f"ratio_{mode}": None, f"pass_{mode}": None})
        out.append(entry)
    return out


def fio_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| job | metric | unmirrored | async mirror | sync mirror | ratio async/unmirrored "
        "| ratio sync/unmirrored | target | async pass/fail | sync pass/fail |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    verdicts = {None: "", True: "pass", False: "**FAIL**"}
    for row in rows:
        cells = [row["job"], row["metric"]]
        cells += [row.get(f"display_{setup}", _number(row[setup])) for setup in SETUPS]
        for mode in MODES:
            ratio = row[f"ratio_{mode}"]
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        cells.append(row["target"])
        cells += [verdicts[row[f"pass_{mode}"]] for mode in MODES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- part 3: partial resync vs rsync -------------------------------------------------------


def changed_offsets(iolog: Path) -> list[int]:
    """Offsets of the writes in a fio (v2 or v3) iolog, sorted and unique."""
    offsets = set()
    for line in iolog.read_text().splitlines():
        fields = line.split()
        for i in (1, 2):  # v2: "file write off len"; v3: "time file write off len"
            if len(fields) == i + 3 and fields[i] == "write":
                offsets.add(int(fields[i + 1]))
    return sorted(offsets)


def copy_blocks(source: Path, target: Path, offsets: list[int]) -> None:
    """The oracle baseline: copy only the changed 4 KiB blocks, then fdatasync."""
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(target, os.O_WRONLY)
        try:
            for offset in offsets:
                os.pwrite(dst, os.pread(src, BLOCK, offset), offset)
            os.fdatasync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def rsync(source: Path, target: Path) -> dict[str, Any]:
    # --ignore-times: rsync's quick check (size + mtime, whole seconds) must not skip the file
    # when the copy and the changes fall in the same second; it does not change the delta work.
    argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats"]
    argv += [str(source), str(target)]
    t0 = time.monotonic()
    code, out, err = run_child(argv, timeout=3600)
    seconds = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"rsync failed ({code}): {err}")
    stats = {}
    for key in ("Literal data", "Matched data", "Total bytes sent"):
        match = re.search(rf"{key}: ([\d,]+)", out)
        if match:
            stats[key.lower().replace(" ", "_")] = int(match.group(1).replace(",", ""))
    return {"seconds": seconds, "argv": argv, **stats}


def resync_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy on the source from the target's start until Mirroring, if asked."""
    if not args.py_spy:
        return None
    out = Path(args.py_spy) / "partial-resync-alpha.folded.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy_path(), "record", "--pid", str(pid), "--threads", "--idle", "--nonblocking"]
    argv += ["--format", "raw", "-o", str(out), "--rate", "250"]
    return spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def resync_part(args: argparse.Namespace, workdir: Path, log: Log) -> dict[str, Any]:
    size = parse_size(args.resync_size)
    directory = workdir / "resync"
    source_file = directory / "alpha.img"
    directory.mkdir(parents=True, exist_ok=True)
    log(f"prefilling the {format_size(size)} mirror source ...")
    prefill(source_file, size)
    pair = Pair(directory, size, source_file, "sync")
    log("creating the mirror (full resync) ...")
    try:
        creation = pair.create(keep_running=True)
        log(f"  full resync: {creation['seconds']:.1f} s ({creation['mib_s']:.0f} MiB/s)")
        log("the target stops; its file is copied aside twice (pre-change data) ...")
        pair.beta.stop()
        wait_state(pair.alpha, "Resync pending", timeout=30)
        sent_before = mirror_view(pair.alpha)["sent_bytes"]
        copies = directory / "rsync-target.img", directory / "blockcopy-target.img"
        t0 = time.monotonic()
        for copy in copies:
            shutil.copyfile(pair.target_file, copy)
        copy_s = time.monotonic() - t0
        change = max(BLOCK, round(size * args.resync_fraction / BLOCK) * BLOCK)
        log(f"changing {change // BLOCK:,} random 4 KiB blocks through NBD (fio randwrite) ...")
        iolog = directory / "changes.iolog"
        extra = ["--rw=randwrite", "--bs=4k", "--iodepth=16", f"--io_size={change}"]
        run_fio(
            "change", pair.uri(), [*extra, f"--write_iolog={iolog}"], directory / "change.json", 600
        )
        offsets = changed_offsets(iolog)
        marked = mirror_view(pair.alpha)["out_of_sync_bytes"]
        os.sync()
        log_mark = len(pair.alpha.log_text())
        log("the target comes back: partial resync ...")
        profiler = resync_profiler(args, pid_of(pair.alpha))
        t_start = time.monotonic()
        start_node(pair.beta)
        t_ready = time.monotonic()
        try:
            back = wait_state(pair.alpha, "Mirroring", timeout=600, poll=0.1)  # API calls cost
        finally:
            t_mirroring = time.monotonic()
            if profiler is not None:
                reap(profiler, signal.SIGINT, grace=60)
        resync_s = resync_seconds(pair.alpha.log_text()[log_mark:])
    finally:
        pair.stop()
    source_sha = sha256(pair.source_file)
    same = source_sha == sha256(pair.target_file)
    log(f"  source and target identical after the partial resync: {same}")
    os.sync()
    log("rsync --inplace --no-whole-file of the source file onto the target's old copy ...")
    rsync_result = rsync(pair.source_file, copies[0])
    rsync_result["identical"] = sha256(copies[0]) == source_sha
    os.sync()
    t0 = time.monotonic()
    copy_blocks(pair.source_file, copies[1], offsets)
    blockcopy = {"seconds": time.monotonic() - t0, "blocks": len(offsets)}
    blockcopy["identical"] = sha256(copies[1]) == source_sha
    for copy in copies:
        copy.unlink()
    return {
        "size": size,
        "fraction": args.resync_fraction,
        "changed_blocks": len(offsets),
        "changed_bytes": len(offsets) * BLOCK,
        "marked_bytes": marked,
        "sent_bytes": back["sent_bytes"] - sent_before,
        "resync_s": resync_s,
        "target_start_to_mirroring_s": t_mirroring - t_start,
        "target_ready_to_mirroring_s": t_mirroring - t_ready,
        "identical": same,
        "full_resync": creation,
        "copy_aside_s": copy_s,
        "rsync": rsync_result,
        "blockcopy": blockcopy,
    }


def resync_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(metric, value, target, verdict) rows of the resync table."""
    size, resync_s, rsync_s = r["size"], r["resync_s"], r["rsync"]["seconds"]
    ratio = rsync_s / resync_s if resync_s else None
    wall_ratio = rsync_s / r["target_ready_to_mirroring_s"]
    sent_ratio = r["sent_bytes"] / r["marked_bytes"] if r["marked_bytes"] else None
    literal = r["rsync"].get("literal_data")

    def pct(n: int) -> str:
        return f"{format_size(n)} ({100 * n / size:.2f}% of the volume)"

    return [
        ("volume size", format_size(size), "", None),
        ("4 KiB blocks changed while the target was away", f"{r['changed_blocks']:,}", "", None),
        (
            "out_of_sync_bytes (marked) before the target came back",
            pct(r["marked_bytes"]),
            "",
            None,
        ),
        ("partial resync: bytes sent", pct(r["sent_bytes"]), "", None),
        (
            "partial resync: bytes sent / marked",
            "-" if sent_ratio is None else f"{sent_ratio:.2f}x",
            f"<= {RESYNC_BYTES_TARGET}x",
            None if sent_ratio is None else sent_ratio <= RESYNC_BYTES_TARGET,
        ),
        ("partial resync: Resyncing -> Mirroring (source's log)", _secs(resync_s), "", None),
        (
            "target daemon ready -> Mirroring (includes reconnect)",
            _secs(r["target_ready_to_mirroring_s"]),
            "info",
            None,
        ),
        (
            "target start -> Mirroring (includes daemon start)",
            _secs(r["target_start_to_mirroring_s"]),
            "info",
            None,
        ),
        (
            "source and target byte-identical afterwards",
            str(r["identical"]),
            "True",
            r["identical"],
        ),
        ("rsync --inplace --no-whole-file", _secs(rsync_s), "", None),
        ("rsync literal data", "-" if literal is None else pct(literal), "info", None),
        (
            "rsync result identical to the source",
            str(r["rsync"]["identical"]),
            "True",
            r["rsync"]["identical"],
        ),
        (
            "copy of only the changed blocks (oracle, Python, fdatasync)",
            _secs(r["blockcopy"]["seconds"]),
            "info",
            None,
        ),
        (
            "**ratio rsync / partial resync**",
            "-" if ratio is None else f"{ratio:.1f}x",
            f">= {RESYNC_TARGET:.0f}x",
            None if ratio is None else ratio >= RESYNC_TARGET,
        ),
        ("ratio rsync / (target ready -> Mirroring)", f"{wall_ratio:.1f}x", "info", None),
        (
            "ratio changed-block copy / partial resync",
            "-" if not resync_s else f"{r['blockcopy']['seconds'] / resync_s:.2f}x",
            "info (1.0x = the limit)",
            None,
        ),
        (
            "full resync at mirror creation",
            f"{_secs(r['full_resync']['seconds'])} ({r['full_resync']['mib_s']:.0f} MiB/s)",
            "info",
            None,
        ),
    ]


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def resync_markdown(r: dict[str, Any]) -> str:
    lines = ["| partial resync vs rsync | value | target | pass/fail |", "|---|---:|---|---|"]
    for metric, value, target, verdict in resync_rows(r):
        mark = {None: "", True: "pass", False: "**FAIL**"}[verdict]
        lines.append(f"| {metric} | {value} | {target} | {mark} |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def source_fingerprint() -> str:
    """sha256 over src/ (paths and contents): the daemons import it afresh at every start."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True).stdout
        except OSError:
            return "?"
        return out.strip().split("\n")[0]

    return {
        "fio": first_line(["fio", "--version"]),
        "rsync": first_line(["rsync", "--version"]),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "src_differs_from_commit": str(
            subprocess.run(
                ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src"]
            ).returncode
            != 0
        ),
        "src_fingerprint": source_fingerprint(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", help="fio volume size (1GiB)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run (10)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per setup per job (2)")
    parser.add_argument("--jobs", default=",".join(JOB_NAMES), help="comma-separated subset")
    parser.add_argument(
        "--resync-size", default="4GiB", help="partial-resync volume (4GiB: the issue's case)"
    )
    parser.add_argument(
        "--resync-fraction", type=float, default=0.01, help="share of 4 KiB blocks changed (0.01)"
    )
    parser.add_argument(
        "--queue-limit",
        default=DEFAULT_QUEUE_LIMIT,
        help=f"the async mirror's queue limit ({DEFAULT_QUEUE_LIMIT}, the API's default)",
    )
    parser.add_argument("--rtt-samples", type=int, default=1000, help="ping-pongs (1000)")
    parser.add_argument("--skip-fio", action="store_true", help="only the resync part")
    parser.add_argument("--skip-resync", action="store_true", help="only the fio part")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="smoke: 256MiB volumes, 5 s, 1 repeat")
    parser.add_argument("--workdir", type=Path, help="where the files go (a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--py-spy", metavar="DIR", help="profile every daemon of every fio run into DIR (skews)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--tls", action="store_true", help="links are TLS 1.3 between pinned identities (plain)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runtime, args.size, args.repeat, args.resync_size = 5, "256MiB", 1, "256MiB"
    names = [name.strip() for name in args.jobs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(JOB_NAMES))
    if unknown:
        parser.error(f"unknown job(s) {unknown}; choose from {', '.join(JOB_NAMES)}")
    args.job_list = [job for job in JOBS if job.name in names]
    if not 0 < args.resync_fraction <= 1:
        parser.error("--resync-fraction must be in (0, 1]")
    for option in ("size", "resync_size", "queue_limit"):
        try:
            parse_size(getattr(args, option))
        except ValueError as exc:
            parser.error(f"--{option.replace('_', '-')}: {exc}")
    if args.py_spy and shutil.which(py_spy_path()) is None:
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    for tool in ("fio", "rsync"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y {tool})")
    return args


def check_space(args: argparse.Namespace, workdir: Path) -> None:
    """Refuse to start a run that would fill the disk halfway through."""
    need = 0
    if not args.skip_fio:  # 3 prefilled files, 2 targets filled by their full resync
        need += (len(SETUPS) + len(MODES)) * parse_size(args.size)
    if not args.skip_resync:  # source, target, two copies of the target
        need += 4 * parse_size(args.resync_size)
    free = shutil.disk_usage(workdir).free
    if need > free:
        raise SystemExit(
            f"not enough space in {workdir}: the run needs {format_size(need)}, "
            f"{format_size(free)} is free (--workdir elsewhere, or smaller --size/--resync-size)"
        )


def execute(args: argparse.Namespace, workdir: Path, log: Log) -> int:
    started = time.monotonic()
    notes: list[str] = []
    if args.py_spy:
        notes.append("the daemons ran under py-spy: their numbers are not representative")
    fio_runs = len(args.job_list) * len(SETUPS) * args.repeat * (not args.skip_fio)
    log(
        f"# mirror overhead: {fio_runs} fio runs x {args.runtime} s (volume {args.size}; "
        f"unmirrored, async mirror with queue limit {args.queue_limit}, sync mirror); "
        f"partial resync on {args.resync_size}" + (" (skipped)" if args.skip_resync else "")
    )
    check_space(args, workdir)
    busy = busy_cores()
    hungry = hungry_processes()
    log(f"machine load before the run: {busy:.2f} of {os.cpu_count()} cores busy")
    for line in hungry:
        notes.append(f"another process was busy before the run (numbers skewed): {line}")
        log(f"  warning: {line}")
    rtt = loopback_rtt(args.rtt_samples)
    rtt_us = rtt["tiny"]["p50_us"]
    log(
        f"loopback RTT (Python TCP ping-pong, median of {args.rtt_samples}): "
        f"{rtt_us:.1f} us tiny, {rtt['write_4k']['p50_us']:.1f} us 4 KiB out / 32 B back"
    )
    document: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items() if k != "job_list"},
        "environment": environment(),
        "loopback_rtt": rtt,
        "busy_cores_before": busy,
        "busy_processes_before": hungry,
        "notes": notes,
    }
    tables, failed = [], False
    if not args.skip_fio:
        fio = fio_part(args, workdir, notes, log)
        rows = summarise(fio["runs"], args.job_list, rtt_us)
        document.update(summary=rows, runs=fio["runs"], full_resync=fio["full_resync"])
        tables.append(fio_markdown(rows))
        failed |= any(row[f"pass_{mode}"] is False for row in rows for mode in MODES)
    if not args.skip_resync:
        resync = resync_part(args, workdir, log)
        document["resync"] = resync
        tables.append(resync_markdown(resync))
        failed |= any(verdict is False for *_, verdict in resync_rows(resync))
    document["wall_seconds"] = time.monotonic() - started
    document["src_fingerprint_at_end"] = source_fingerprint()
    if document["src_fingerprint_at_end"] != document["environment"]["src_fingerprint"]:
        notes.append(
            "src/ changed during the run: daemons started at different times ran different code"
        )
    if document["environment"]["src_differs_from_commit"] == "True":
        notes.append(f"src/ has uncommitted changes (commit {document['environment']['commit']})")
    report(args, tables, notes, rtt_us, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    log(f"results: {args.out} (total {time.monotonic() - started:.0f} s)")
    return 1 if failed and args.strict else 0


def report(
    args: argparse.Namespace, tables: list[str], notes: list[str], rtt: float, log: Log
) -> None:
    log("")
    for job in args.job_list if not args.skip_fio else []:
        log(f"- {job.name}: {job.title}")
    log("")
    for table in tables:
        log(table)
        log("")
    if not args.skip_fio:
        log(
            f"ratio = async or sync mirror / unmirrored, medians of {args.repeat} run(s); CPU ="
            " utime+stime of every daemon (alpha+beta when mirrored), per GiB: from fio's start"
            " until the mirror has drained (Mirroring, queue 0), CPU %: while fio ran; loopback"
            f" RTT p50 = {rtt:.1f} us; async queue limit {args.queue_limit}; links:"
            f" {'TLS 1.3, pinned identities' if args.tls else 'plain TCP (insecure peers)'}."
        )
    for note in notes:
        log(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        args.workdir, args.keep, "volkeeper-mirror-",
        lambda workdir, say: execute(args, workdir, say), reap_all,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
