"""The DataKeeper 7.2.1 review's overhead experiment, repeated with volkeeper.

How this works (../shared/reference/datakeeper-7.2.1-review.txt, "Performance overhead"):
two nodes run in two network namespaces joined by a veth pair shaped to 1 Gbit/s with
``tc tbf`` on both ends (the review: a dedicated 1 GbE NIC), so replication crosses a real,
limited link; alpha serves five volumes over NBD (unix sockets, in the root namespace, where
fio runs).  A *worker* is one fio job doing 64 KiB random I/O at about 28 MB/s, two reads to
one write (``--rate`` 18.7 MB/s read, 9.3 MB/s write), its data about 3.5:1 compressible by
zlib level 1 (``--buffer_compress_percentage``).  Two series: **scale up** (1..5 workers on
one volume) and **scale out** (1..5 volumes, one worker each).  Each series has nine runs:
no mirroring, mirrored without compression, then mirrored with zlib 1, 3, 6, 9, zstd 1, 3 and
lz4 -- the mirrors are created once (full resync, not measured) and the codec is changed live
between runs (``mirror set``), the review's seven levels becoming these seven settings.

Every stage (one run x one worker count) lasts ``--stage-seconds`` and records: fio's read and
write throughput, the CPU seconds of both daemons (/proc) and of fio (its rusage), payload
bytes before compression and on the wire (the source's ``sent_bytes`` / ``wire_bytes``), the
compression ratio, and whether every mirror stayed Mirroring (polled twice a second).  Between
stages the async queue (``--mode async``) drains.  Output: a markdown table per series with
ratios to the unmirrored run, the JSON, and PNG plots (write throughput and daemon CPU against
workers, one line per run), in ``--out``.  Needs root (namespaces, tc).  Targets from the
issue: mirroring costs <= 2% of write throughput; the best compression setting <= 5% with a
ratio >= 3:1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_seconds, reap, reap_children, run_benchmark, spawn

from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

SETTINGS: list[str | None] = [None, "none", "zlib:1", "zlib:3", "zlib:6", "zlib:9", "zstd:1",
                              "zstd:3", "lz4"]  # fmt: skip
VOLUMES = 5
READ_RATE, WRITE_RATE = "18666k", "9333k"  # bytes/s per worker: ~28 MB/s, 2:1
COMPRESSIBLE = ("--buffer_compress_percentage=72", "--refill_buffers",
                "--buffer_compress_chunk=4k")  # fmt: skip
MB = 1_000_000


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Link:
    """Two namespaces and a veth pair between them, 1 Gbit/s each way (tc tbf)."""

    def __init__(self, rate: str) -> None:
        tag = os.getpid() % 10000
        self.source, self.target = f"vk-src-{tag}", f"vk-dst-{tag}"
        self.source_ip, self.target_ip = f"10.{tag % 200 + 20}.0.1", f"10.{tag % 200 + 20}.0.2"
        self.rate = rate

    def __enter__(self) -> Link:
        tag = self.source.rsplit("-", 1)[1]
        for ns in (self.source, self.target):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"vka{tag}", "netns", self.source, "type", "veth",
           "peer", "name", f"vkb{tag}", "netns", self.target)  # fmt: skip
        for ns, dev, ip in ((self.source, f"vka{tag}", self.source_ip),
                            (self.target, f"vkb{tag}", self.target_ip)):  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
               "burst", "256kb", "latency", "50ms")  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.source, self.target):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def nodes(workdir: Path, link: Link, size: str) -> tuple[LocalNode, LocalNode]:
    volumes = [VolumeSpec(f"data{i}", size) for i in range(1, VOLUMES + 1)]
    alpha_port = free_tcp_port()  # beta, the target, must know its source
    beta = LocalNode(workdir / "beta", "beta", volumes, host=link.target_ip, netns=link.target,
                     peers={"alpha": f"{link.source_ip}:{alpha_port}"})  # fmt: skip
    beta.start()
    alpha = LocalNode(workdir / "alpha", "alpha", [VolumeSpec(v.name, size) for v in volumes],
                      peers={"beta": f"{link.target_ip}:{beta.peer_port}"},
                      host=link.source_ip, netns=link.source, peer_port=alpha_port)  # fmt: skip
    alpha.start()
    return alpha, beta


def fio_argv(alpha: LocalNode, volumes: list[str], numjobs: int, seconds: float,
             output: Path, size: str) -> list[str]:  # fmt: skip
    argv = ["fio", "--thread", "--ioengine=nbd", "--output-format=json", f"--output={output}",
            "--rw=randrw", "--rwmixread=67", "--bs=64k", f"--rate={READ_RATE},{WRITE_RATE}",
            "--time_based", f"--runtime={seconds:g}", f"--size={size}", "--group_reporting",
            *COMPRESSIBLE]  # fmt: skip
    for volume in volumes:
        argv += [f"--name={volume}", f"--uri={alpha.uri(volume)}", f"--numjobs={numjobs}"]
    return argv


def mirrors(alpha: LocalNode) -> list[dict[str, Any]]:
    with alpha.api() as api:
        return [m for m in api.get("/status").json()["mirrors"] if m["role"] == "source"]


class StateWatch(threading.Thread):
    """Polls the mirrors' states during a stage; ``left`` lists every state seen not Mirroring."""

    def __init__(self, alpha: LocalNode) -> None:
        super().__init__(daemon=True)
        self.alpha, self.left, self._stop_event = alpha, set[str](), threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            self.left |= {m["state"] for m in mirrors(self.alpha) if m["state"] != "Mirroring"}

    def stop(self) -> set[str]:
        self._stop_event.set()
        self.join(5)
        return self.left


def stage(alpha: LocalNode, beta: LocalNode, volumes: list[str], numjobs: int,
          args: argparse.Namespace, out: Path) -> dict[str, Any]:  # fmt: skip
    pids = [p.pid for p in (alpha.process, beta.process) if p is not None]
    before = [cpu_seconds(pid) for pid in pids]
    start = mirrors(alpha)
    watch = StateWatch(alpha)
    watch.start()
    output = out / f"fio-{time.monotonic_ns()}.json"
    errors = output.with_suffix(".stderr").open("wb")
    proc = spawn(fio_argv(alpha, volumes, numjobs, args.stage_seconds, output, args.size),
                 stdout=subprocess.DEVNULL, stderr=errors)  # fmt: skip
    errors.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reap(proc)
    left = watch.stop()
    after = [cpu_seconds(pid) for pid in pids]
    end = mirrors(alpha)
    text = output.read_text() if output.exists() else ""
    if proc.returncode != 0 or "{" not in text:
        why = output.with_suffix(".stderr").read_text()[-2000:]
        raise RuntimeError(f"fio failed ({proc.returncode}): {why}")
    result = json.loads(text[text.index("{") :])["jobs"][0]
    drained = drain(alpha, args.drain_timeout)
    sent = sum(m["sent_bytes"] for m in end) - sum(m["sent_bytes"] for m in start)
    wire = sum(m["wire_bytes"] for m in end) - sum(m["wire_bytes"] for m in start)
    return {
        "write_mb_s": result["write"]["bw_bytes"] / MB,
        "read_mb_s": result["read"]["bw_bytes"] / MB,
        "daemon_cpu_s": sum(after) - sum(before),
        "fio_cpu_s": usage.ru_utime + usage.ru_stime,
        "sent_mb": sent / MB,
        "wire_mb": wire / MB,
        "ratio": round(sent / wire, 2) if wire else None,
        "stayed_mirroring": not left and drained,
        "states_seen": sorted(left),
    }


def prefill(alpha: LocalNode, size: str) -> None:
    """Every volume written once with data compressible like the workers' own."""
    for i in range(1, VOLUMES + 1):
        proc = spawn(["fio", "--thread", "--ioengine=nbd", f"--name=p{i}",
                      f"--uri={alpha.uri(f'data{i}')}", "--rw=write", "--bs=1M",
                      f"--size={size}", "--output=/dev/null", *COMPRESSIBLE],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if proc.wait() != 0:
            raise RuntimeError(f"prefilling data{i} failed")
        reap(proc)


def drain(alpha: LocalNode, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = mirrors(alpha)
        if all(m["state"] == "Mirroring" and not m["queue_bytes"] for m in views):
            return True
        time.sleep(0.2)
    return False


def series(name: str, alpha: LocalNode, beta: LocalNode, args: argparse.Namespace,
           out: Path, log: Any) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    up = name == "scale up"  # n workers on one volume; else one worker on each of n volumes

    def volumes_of(workers: int) -> list[str]:
        return ["data1"] if up else [f"data{i}" for i in range(1, workers + 1)]

    used = sorted({v for n in args.workers for v in volumes_of(n)})
    for setting in SETTINGS:
        if setting == "none":  # mirrors from here on: created once, full resync not measured
            create_jobs(alpha, used, args)
        elif setting is not None:
            for volume in used:
                set_compression(alpha, volume, setting)
        for workers in args.workers:
            row = {"series": name, "run": setting or "unmirrored", "workers": workers}
            numjobs = workers if up else 1
            row |= stage(alpha, beta, volumes_of(workers), numjobs, args, out)
            log(f"{name:9} {row['run']:10} {workers} workers: write {row['write_mb_s']:6.1f} "
                f"MB/s, daemons {row['daemon_cpu_s']:6.1f} CPU-s, wire {row['wire_mb']:7.1f} MB"
                f", ratio {row['ratio']}, mirroring {row['stayed_mirroring']}")  # fmt: skip
            rows.append(row)
    delete_jobs(alpha, used)
    return rows


def create_jobs(alpha: LocalNode, volumes: list[str], args: argparse.Namespace) -> None:
    with alpha.api() as api:
        for volume in volumes:
            body = {"name": f"review-{volume}", "source": f"alpha:{volume}",
                    "target": f"beta:{volume}", "mode": args.mode, "confirm": True,
                    "queue_limit": "256MiB"}  # fmt: skip
            reply = api.post("/jobs", json=body)
            if reply.status_code != 201:
                raise RuntimeError(f"job for {volume}: {reply.status_code} {reply.text}")
    if not drain(alpha, 600):
        raise RuntimeError(f"mirrors not Mirroring after their full resync: {mirrors(alpha)}")


def set_compression(alpha: LocalNode, volume: str, setting: str) -> None:
    with alpha.api() as api:
        reply = api.patch(f"/jobs/review-{volume}/mirror", json={"compression": setting})
        if reply.status_code != 200:
            raise RuntimeError(f"mirror set {volume}: {reply.status_code} {reply.text}")


def delete_jobs(alpha: LocalNode, volumes: list[str]) -> None:
    with alpha.api() as api:
        for volume in volumes:
            api.delete(f"/jobs/review-{volume}")


def markdown(rows: list[dict[str, Any]]) -> str:
    base = {(r["series"], r["workers"]): r for r in rows if r["run"] == "unmirrored"}
    lines = ["| series | run | workers | write MB/s | vs unmirrored | daemons CPU-s | vs unmirrored"
             " | fio CPU-s | wire MB | ratio | stayed Mirroring |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        b = base[(r["series"], r["workers"])]
        write = r["write_mb_s"] / b["write_mb_s"] if b["write_mb_s"] else 0
        cpu = r["daemon_cpu_s"] / b["daemon_cpu_s"] if b["daemon_cpu_s"] else 0
        stayed = "" if r["run"] == "unmirrored" else ("yes" if r["stayed_mirroring"] else
                                                     f"NO {r['states_seen']}")  # fmt: skip
        lines.append(f"| {r['series']} | {r['run']} | {r['workers']} | {r['write_mb_s']:.1f} | "
                     f"{write:.3f}x | {r['daemon_cpu_s']:.1f} | {cpu:.2f}x | "
                     f"{r['fio_cpu_s']:.1f} | {r['wire_mb']:.1f} | {r['ratio'] or '-'} | "
                     f"{stayed} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> str:
    """The issue's targets, judged on the stages with the most workers."""
    out = []
    for name in ("scale up", "scale out"):
        mine = [r for r in rows if r["series"] == name]
        if not mine:
            continue
        top = max(r["workers"] for r in mine)
        at = {r["run"]: r for r in mine if r["workers"] == top}
        base = at["unmirrored"]["write_mb_s"]
        cost = 1 - at["none"]["write_mb_s"] / base
        best = min((r for k, r in at.items() if k not in ("unmirrored", "none")),
                   key=lambda r: 1 - r["write_mb_s"] / base)  # fmt: skip
        best_cost = 1 - best["write_mb_s"] / base
        out.append(f"{name}, {top} workers: mirroring costs {cost:.1%} of write throughput "
                   f"(target <= 2%: {'pass' if cost <= 0.02 else 'FAIL'}); best compression "
                   f"{best['run']} costs {best_cost:.1%} (target <= 5%: "
                   f"{'pass' if best_cost <= 0.05 else 'FAIL'}) at {best['ratio']}:1 "
                   f"(target >= 3: {'pass' if (best['ratio'] or 0) >= 3 else 'FAIL'})")  # fmt: skip
    return "\n".join(out) + "\n"


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name in ("scale up", "scale out"):
        mine = [r for r in rows if r["series"] == name]
        if not mine:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for run in dict.fromkeys(r["run"] for r in mine):
            points = [r for r in mine if r["run"] == run]
            workers = [r["workers"] for r in points]
            left.plot(workers, [r["write_mb_s"] for r in points], marker="o", label=run)
            right.plot(workers, [r["daemon_cpu_s"] for r in points], marker="o", label=run)
        left.set(title=f"{name}: write throughput", xlabel="workers", ylabel="MB/s")
        right.set(title=f"{name}: daemons' CPU per stage", xlabel="workers", ylabel="CPU-s")
        left.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"review-{name.replace(' ', '-')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        made.append(path)
    return made


def execute(args: argparse.Namespace, workdir: Path, log: Any) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with Link(args.link_rate) as link:
        alpha, beta = nodes(workdir, link, args.size)
        try:
            log(f"link {args.link_rate} between {link.source} and {link.target}; "
                f"stages of {args.stage_seconds:g} s, workers {args.workers}")  # fmt: skip
            prefill(alpha, args.size)
            rows = []
            for name in args.series:
                rows += series(name, alpha, beta, args, out, log)
        finally:
            alpha.stop()
            beta.stop()
    (out / "review.json").write_text(json.dumps(rows, indent=2))
    report = markdown(rows) + "\n" + summary(rows)
    (out / "review.md").write_text(report)
    log(report)
    for path in plots(rows, out):
        log(f"plot: {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage-seconds", type=float, default=60.0)
    parser.add_argument("--short", action="store_true", help="10 s stages, 1, 3 and 5 workers")
    parser.add_argument("--workers", type=lambda t: [int(n) for n in t.split(",")],
                        default=[1, 2, 3, 4, 5])  # fmt: skip
    parser.add_argument("--series", type=lambda t: t.split(","), default=["scale up", "scale out"])
    parser.add_argument("--mode", default="sync", choices=("sync", "async"))
    parser.add_argument("--size", default="512MiB", help="each of the five volumes")
    parser.add_argument("--link-rate", default="1gbit", help="tc tbf rate of the veth pair")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--out", default="bench/results/review")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.short:
        args.stage_seconds, args.workers = 10.0, [1, 3, 5]
    if os.geteuid() != 0:
        print("needs root: network namespaces and tc", file=sys.stderr)
        return 2

    def run(workdir: Path, log: Any) -> int:
        return execute(args, workdir, log)

    return run_benchmark(args.workdir, args.keep, "vk-review-", run, reap_children)


if __name__ == "__main__":
    sys.exit(main())
