"""Pieces the benchmarks share: child processes stopped by PID, CPU time, fio numbers.

How this works: every child a benchmark starts goes through ``spawn`` and is remembered by
PID, so ``reap_children`` can stop whatever is left on any exit, Ctrl-C included;
``run_benchmark`` is the shared main (signals become KeyboardInterrupt, every process is
reaped, the work directory goes).  ``cpu_seconds`` reads a process's utime + stime from
/proc; ``percentile_us`` and ``format_number`` read and print fio's JSON numbers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")

_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
    _children[proc.pid] = proc
    return proc


def reap(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal one child we started, by PID; SIGKILL it if it outlives the grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    _children.pop(proc.pid, None)


def reap_children() -> None:
    for proc in list(_children.values()):
        reap(proc, grace=5.0)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_benchmark(
    workdir: Path | None,
    keep: bool,
    prefix: str,
    execute: Callable[[Path, Callable[[str], None]], int],
    reap_all: Callable[[], None],
) -> int:
    """A benchmark's main: signals become KeyboardInterrupt, every process started is reaped
    on the way out, and a temporary work directory is removed unless ``keep``."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a shell's
        signal.signal(signum, raise_interrupt)  # background job starts with it ignored
    directory = workdir or Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return execute(directory, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted; stopping every process started", file=sys.stderr)
        return 130
    finally:
        reap_all()
        if not keep and workdir is None:
            shutil.rmtree(directory, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. ; utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile_us(section: dict[str, Any], kind: str, pct: str) -> float | None:
    value = section.get(kind, {}).get("percentile", {}).get(pct)
    return None if value is None else value / 1000


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"
