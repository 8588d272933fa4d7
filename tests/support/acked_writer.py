"""A writer that remembers every write its NBD server acknowledged, and a checker for it.

How this works: ``AckedWriter`` (a thread) writes 4 KiB blocks whose content names the block
and a version (``block_bytes``), at random among ``blocks`` blocks, through the raw NBD
client of tests/integration/rawnbd.py, one request at a time, with a FLUSH every
``flush_every`` writes.  It keeps, per block, the last version a reply acknowledged
(``acked``) and the version of a write that was sent and never answered (``unknown``: it
may or may not have landed).  When its connection fails or a write is refused (the source
moved: the volume is a locked target now), it tries its list of sockets again, in turn,
until one takes a write; ``switches`` counts that.  ``check(image)`` then proves every
acknowledged write is in a volume image: each block holds its last acknowledged version,
or the unanswered one that followed it (never an older version, never another block's).
"""

from __future__ import annotations

import random
import struct
import threading
import time
from pathlib import Path

from tests.integration.rawnbd import NbdClosed, NbdTimeout, RawNbd

BLOCK = 4096
_HEAD = struct.Struct(">8sII")  # magic, block, version
_MAGIC = b"VKACKED1"


def block_bytes(block: int, version: int) -> bytes:
    head = _HEAD.pack(_MAGIC, block, version)
    return head + bytes([(block + version) & 0xFF]) * (BLOCK - len(head))


class AckedWriter(threading.Thread):
    def __init__(
        self,
        sockets: list[Path],
        export: str = "data1",
        blocks: int = 2048,
        flush_every: int = 32,
        seed: int = 1,
    ) -> None:
        super().__init__(daemon=True)
        self.sockets, self.export, self.blocks = sockets, export, blocks
        self.flush_every = flush_every
        self.random = random.Random(seed)
        self.acked: dict[int, int] = {}
        self.unknown: dict[int, int] = {}
        self.history: list[tuple[int, int]] = []  # (version, block) of every write sent
        self.acked_versions: set[int] = set()
        self.halt = threading.Event()
        self.writes = self.switches = 0
        self.errors: list[str] = []
        self.serving: Path | None = None  # the socket that took the last write
        self._version = 0

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.errors.append(repr(exc))

    def _run(self) -> None:
        client = self._connect(None)
        while not self.halt.is_set():
            if client is None:
                client = self._connect(self.serving)
                continue
            if not self._write_one(client):
                client.close()
                client = None
                self.switches += 1

    def _write_one(self, client: RawNbd) -> bool:
        block = self.random.randrange(self.blocks)
        self._version += 1
        self.unknown[block] = self._version
        self.history.append((self._version, block))
        try:
            reply = client.write(block * BLOCK, block_bytes(block, self._version))
            if reply.error == 0:
                self.acked[block] = self.unknown.pop(block)
                self.acked_versions.add(self._version)
                self.writes += 1
                if self.writes % self.flush_every == 0:
                    return client.flush().error == 0
                return True
        except (NbdClosed, NbdTimeout, OSError):
            pass
        return False

    def _connect(self, avoid: Path | None) -> RawNbd | None:
        """The first socket whose export takes writes (the one used last, last)."""
        order = sorted(self.sockets, key=lambda path: path == avoid)
        for path in order:
            try:
                client = RawNbd.open(path, self.export, timeout=5.0)
            except (NbdClosed, NbdTimeout, OSError, AssertionError):
                continue
            if client.export is not None and not client.export.flags & 2:  # not READ_ONLY
                self.serving = path
                return client
            client.close()
        time.sleep(0.01)
        return None

    def wait_writes(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.writes < count:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {self.writes} writes acknowledged"
            time.sleep(0.01)

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the writer did not stop"
        assert not self.errors, self.errors

    def check(self, image: Path) -> None:
        """Every acknowledged write is in ``image``; raises naming the first one missing."""
        with image.open("rb") as volume:
            for block in range(self.blocks):
                volume.seek(block * BLOCK)
                data = volume.read(BLOCK)
                if block not in self.acked and block not in self.unknown:
                    continue
                acked = self.acked.get(block)  # None: none was (the block as it was before)
                allowed = {acked, self.unknown.get(block, acked)}
                found = version_of(data, block)
                assert found in allowed, (
                    f"{image.name}: block {block} holds version {found}, but version "
                    f"{self.acked.get(block)} was acknowledged "
                    f"(unanswered: {self.unknown.get(block)})"
                )

    def check_prefix(self, image: Path) -> tuple[int, list[int]]:
        """``image`` is the volume as it was after some prefix of the writes, in the order
        they were sent (write-order fidelity); returns the last version of that prefix and
        the versions acknowledged after it (what the image lacks)."""
        found = {}
        with image.open("rb") as volume:
            for block in range(self.blocks):
                volume.seek(block * BLOCK)
                found[block] = version_of(volume.read(BLOCK), block)
        cut = max((v for v in found.values() if v is not None), default=0)
        latest: dict[int, int] = {}
        for version, block in self.history:
            if version <= cut:
                latest[block] = version
        for block in range(self.blocks):
            assert found[block] == latest.get(block), (
                f"{image.name}: block {block} holds version {found[block]}, but after the "
                f"writes up to version {cut} it held {latest.get(block)}: write order broken"
            )
        return cut, [v for v, _ in self.history if v > cut and v in self.acked_versions]


def version_of(data: bytes, block: int) -> int | None:
    magic, found_block, version = _HEAD.unpack_from(data)
    if magic != _MAGIC or found_block != block or data != block_bytes(block, version):
        return None
    return version
