"""What the application was told, and so what each copy of the volume may hold.

How this works: ``History`` reads the workload's log (tests/fault/nbd_workload.py) as it
grows and keeps, per 4 KiB block, the set of versions the block may hold now (``allowed``):
the last acknowledged version, plus any version sent after it and not answered (it may or
may not have landed).  A block never written holds its ``base`` version (None: zeros).

NBD durability is the volume's: an acknowledged write is only sure to survive a power cut
once a later FLUSH was acknowledged.  So ``durable`` keeps each block's allowed set as of
the last acknowledged FLUSH, and ``power_cut()`` (the source lost its cache) widens every
block written since to that set plus every version sent since: any of them may be what the
disk kept -- and, until the next ``rebase``, the order is no longer known: the source is no
longer any prefix of what was sent, and neither are the copies that follow it.

``sends`` lists (version, block) in the order sent -- with one request in flight, also the
order acknowledged -- since the base, for the write-order check of an asynchronous copy
(``order_anomaly``).  ``rebase(found)`` starts over from an image proven right (at a
checkpoint, every copy identical and the writer paused), which keeps both checks cheap.
``intervals`` are (sent, answered, ok) times of every request, for the stalls an
application saw; ``failures`` the times and errnos of failed ones.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.acked_writer import BLOCK, version_of

GARBAGE = -1  # a block that is neither zeros nor any version of itself


class History:
    def __init__(self, log: Path, blocks: int) -> None:
        self.log, self.blocks = log, blocks
        self._offset = 0
        self.base: dict[int, int | None] = {}
        self.allowed: dict[int, set[int | None]] = {}
        self.durable: dict[int, set[int | None]] = {}
        self._since_flush: set[int] = set()
        self.sends: list[tuple[int, int]] = []
        self.acked: set[int] = set()
        self.intervals: list[tuple[float, float, bool]] = []
        self.failures: list[tuple[float, str]] = []
        self.acked_writes = self.acked_flushes = 0
        self._open: dict[str, tuple[float, int]] = {}  # request kind -> (sent at, version)
        self.order_known = True  # False from a power cut of the source to the next rebase

    def may_hold(self, block: int) -> set[int | None]:
        return self.allowed.get(block, {self.base.get(block)})

    # -- reading the log ------------------------------------------------------------------------

    def read(self) -> None:
        with self.log.open() as log:
            log.seek(self._offset)
            text = log.read()
        complete = text[: text.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            self._event(line.split())

    def _event(self, words: list[str]) -> None:
        kind, at = words[0], float(words[-1])
        if kind == "S":
            version, block = int(words[1]), int(words[2])
            self.sends.append((version, block))
            self.allowed.setdefault(block, {self.base.get(block)}).add(version)
            self._since_flush.add(block)
            self._open["write"] = (at, block)
        elif kind == "A":
            sent, block = self._open.pop("write")
            self.allowed[block] = {int(words[1])}
            self.acked.add(int(words[1]))
            self.acked_writes += 1
            self.intervals.append((sent, at, True))
        elif kind == "F":
            self._open["flush"] = (at, 0)
        elif kind == "FA":
            sent, _ = self._open.pop("flush")
            self.intervals.append((sent, at, True))
            self.acked_flushes += 1
            for block in self._since_flush:
                self.durable[block] = set(self.allowed[block])
            self._since_flush.clear()
        elif kind in ("E", "FE"):
            sent, _ = self._open.pop("write" if kind == "E" else "flush")
            self.intervals.append((sent, at, False))
            self.failures.append((at, words[2]))

    # -- what a fault changes -------------------------------------------------------------------

    def power_cut(self) -> None:
        """The source lost its unflushed writes: each block written since the last FLUSH may
        hold what it held then, or anything sent since."""
        self.read()
        since: dict[int, set[int | None]] = {}
        for version, block in self.sends:
            if block in self._since_flush:
                since.setdefault(block, set()).add(version)
        for block in self._since_flush:
            durable = self.durable.get(block, {self.base.get(block)})
            self.allowed[block] = durable | since.get(block, set())
        self.order_known = False  # the source kept some of its cache: no prefix of anything

    def rebase(self, found: dict[int, int | None]) -> None:
        self.base = dict(found)
        self.allowed, self.durable = {}, {}
        self._since_flush.clear()
        self.sends.clear()
        self.order_known = True

    # -- checks ---------------------------------------------------------------------------------

    def lost_writes(self, found: dict[int, int | None]) -> list[str]:
        """Blocks of an image that do not hold what they may (an acknowledged write lost)."""
        return [
            f"block {block} holds {_name(found[block])}, may hold {sorted(map(_name, allowed))}"
            for block in range(self.blocks)
            if found[block] not in (allowed := self.may_hold(block))
        ]

    def order_anomaly(self, found: dict[int, int | None]) -> str | None:
        """None if ``found`` is the volume as some prefix of the writes sent left it (an
        unanswered write in that prefix may or may not have landed), else why not.  Not
        known after a power cut of the source (until the next rebase): the source itself kept
        an arbitrary part of its cache, and its copies follow it."""
        if not self.order_known:
            return None
        cut = max((v for v in found.values() if v is not None and v > 0), default=0)
        prefix: dict[int, set[int | None]] = {}
        for version, block in self.sends:
            if version > cut:
                break
            held = prefix.setdefault(block, {self.base.get(block)})
            if version in self.acked:
                held.clear()
            held.add(version)
        for block in range(self.blocks):
            held = prefix.get(block, {self.base.get(block)})
            if found[block] not in held:
                return (
                    f"block {block} holds {_name(found[block])}, but after the writes up to "
                    f"version {cut} it held {sorted(map(_name, held))}: write order broken"
                )
        return None


def _name(version: int | None) -> str:
    return {None: "zeros", GARBAGE: "garbage"}.get(version, f"v{version}")


def read_image(path: Path, blocks: int) -> tuple[bytes, dict[int, int | None]]:
    """A volume's bytes, and the version each of the first ``blocks`` blocks holds."""
    data = path.read_bytes()
    found: dict[int, int | None] = {}
    for block in range(blocks):
        piece = data[block * BLOCK : (block + 1) * BLOCK]
        version = version_of(piece, block) if len(piece) == BLOCK else None
        if version is None and piece.count(0) != len(piece):
            version = GARBAGE
        found[block] = version
    return data, found


def differing_bytes(a: bytes, b: bytes) -> int:
    """Bytes in 4 KiB blocks that differ (the unit the checker compares)."""
    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(BLOCK for at in range(0, len(a), BLOCK) if a[at : at + BLOCK] != b[at : at + BLOCK])
