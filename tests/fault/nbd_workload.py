"""The nemesis's application: writes versioned blocks through libnbd and logs every answer.

Run with a Python that imports libnbd's bindings (Debian's python3-libnbd):
``python3 nbd_workload.py CONFIG.json``, where the config gives ``uris`` (every node's export
of the volume, tried in turn), ``blocks``, ``flush_every``, ``seed`` and ``log``.  One
request at a time (so the order sent is the order acknowledged), it writes a random block
of the first ``blocks`` 4 KiB blocks with content that names the block and a version
(tests/support/acked_writer.py's ``block_bytes``), and a FLUSH after every ``flush_every``
acknowledged writes.  Every step is a line of the log, with CLOCK_MONOTONIC seconds (the
same clock as the harness's ``time.monotonic()``):

    S version block t       a write sent          F n t          a FLUSH sent
    A version t             acknowledged          FA n t         a FLUSH acknowledged
    E version errno t       failed (error reply, or the connection went; may have landed)
    FE n errno t            a FLUSH failed (errno: libnbd's name for it, e.g. EIO)
    C uri t                 connected to an export that takes writes

After any failed request (the connection went, the disk failed, the volume is a locked
target now that the source moved) it connects again, trying the uris in turn, the one it
used last, last, and skipping read-only exports.  Commands on stdin: ``pause``
(answered ``paused`` on stdout once no request is in flight), ``resume``; stdin closing
stops it.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nbd  # type: ignore[import-not-found]

from tests.support.acked_writer import BLOCK, block_bytes


class Workload:
    def __init__(self, config: dict[str, Any], log: IO[str]) -> None:
        self.uris: list[str] = config["uris"]
        self.blocks: int = config["blocks"]
        self.flush_every: int = config["flush_every"]
        self.random = random.Random(config["seed"])
        self.log = log
        self.running = threading.Event()
        self.running.set()
        self.pause_asked = threading.Event()
        self.stopped = threading.Event()
        self.handle: Any = None
        self.last_uri: str | None = None
        self.version = self.flushes = self.acked = 0

    def note(self, *words: object) -> None:
        self.log.write(" ".join(map(str, words)) + f" {time.monotonic():.6f}\n")
        self.log.flush()

    def run(self) -> None:
        while not self.stopped.is_set():
            if self.pause_asked.is_set():
                self.pause_asked.clear()
                self.running.clear()
                print("paused", flush=True)
            self.running.wait()
            if self.stopped.is_set():
                return
            if self.handle is None:
                self.connect()
            else:
                self.step()

    def connect(self) -> None:
        order = sorted(self.uris, key=lambda uri: uri == self.last_uri)
        for uri in order:
            handle = nbd.NBD()
            try:
                handle.connect_uri(uri)
                if not handle.is_read_only():
                    self.handle, self.last_uri = handle, uri
                    self.note("C", uri)
                    return
            except nbd.Error:
                pass
            del handle  # closes the connection
        time.sleep(0.05)

    def step(self) -> None:
        block = self.random.randrange(self.blocks)
        self.version += 1
        self.note("S", self.version, block)
        try:
            self.handle.pwrite(block_bytes(block, self.version), block * BLOCK)
        except nbd.Error as error:
            self.note("E", self.version, error.errno or "none")
            self.drop()
            return
        self.note("A", self.version)
        self.acked += 1
        if self.acked % self.flush_every == 0:
            self.flushes += 1
            self.note("F", self.flushes)
            try:
                self.handle.flush()
                self.note("FA", self.flushes)
            except nbd.Error as error:
                self.note("FE", self.flushes, error.errno or "none")
                self.drop()

    def drop(self) -> None:
        """After a failed request, connect again (the source may have moved, or the
        connection gone): the same export only if no other takes writes."""
        self.handle = None  # the handle closes its connection when it goes


def commands(workload: Workload) -> None:
    for line in sys.stdin:
        word = line.strip()
        if word == "pause":
            workload.pause_asked.set()
        elif word == "resume":
            workload.running.set()
    workload.stopped.set()
    workload.running.set()


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    with open(config["log"], "a") as log:
        workload = Workload(config, log)
        threading.Thread(target=commands, args=(workload,), daemon=True).start()
        workload.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
