"""Drive the workload process (tests/fault/nbd_workload.py) from the harness.

How this works: ``Workload`` starts the script with a Python that imports libnbd's bindings,
hands it the uris of every node's export, and reads its log through a ``History``.
``pause()`` asks it to stop after the request in flight and waits for the answer, at most
``timeout`` seconds (a request can hang as long as the source does: then it answers False
and the writer stays asked to pause, so nothing changes while the checker looks);
``resume()`` lets it go on; ``stop()`` closes its stdin and, if it does not end, kills it
by PID.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
from pathlib import Path

from tests.fault.history import History
from tests.support.mirroring import python_with_libnbd

SCRIPT = Path(__file__).with_name("nbd_workload.py")


class Workload:
    def __init__(
        self, directory: Path, uris: list[str], blocks: int, seed: int, flush_every: int = 16
    ) -> None:
        python = python_with_libnbd()
        if python is None:
            raise RuntimeError("no python3 imports libnbd's bindings (Debian: python3-libnbd)")
        log = directory / "workload.log"
        log.touch()
        config = directory / "workload.json"
        config.write_text(json.dumps({"uris": uris, "blocks": blocks, "seed": seed,
                                      "flush_every": flush_every, "log": str(log)}))  # fmt: skip
        self.history = History(log, blocks)
        with (directory / "workload.err").open("w") as errors:
            self.process = subprocess.Popen(
                [python, str(SCRIPT), str(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
            )  # fmt: skip
        self.paused = self._answered = False

    def _send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def pause(self, timeout: float = 5.0) -> bool:
        """True once no request is in flight (and none will be until ``resume``)."""
        assert self.process.stdout is not None
        if not self.paused:
            self._send("pause")
            self.paused = True
            self._answered = False
        if not self._answered:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                return False
            line = self.process.stdout.readline()
            if line.strip() != "paused":
                raise RuntimeError(f"workload ended: {line!r} (exit {self.process.poll()})")
            self._answered = True
        self.history.read()
        return True

    def resume(self) -> None:
        """Go on writing (after a pause that was answered; one that was not stays asked)."""
        if self.paused and self._answered:
            self._send("resume")
            self.paused = False

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.history.read()
