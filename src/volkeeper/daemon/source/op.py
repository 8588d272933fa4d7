"""One application mutation or flush of a source volume, as the local disk and every mirror see it.

How this works: ``Replication`` (daemon/source/replication.py) turns each NBD WRITE, WRITE_ZEROES,
TRIM and FLUSH into an ``Op`` and hands it to the local disk and to every mirror.  Each of
them owes the op one *reply part*: the NBD reply leaves when ``parts`` reaches zero (a sync
mirror pays its part when the target ACKs, an async one as soon as the op is queued).

A flush also has *durable parts*: it proves every earlier write durable on one side when that
side has flushed -- the local disk when its flush returns, a target when it ACKs the FLUSH
frame (for an async mirror that is after the reply).  Once every side has, ``on_durable``
runs: the activity-log pins of the writes before the flush can go.

A mutation the local disk fails may still reach a target: every mirror that shipped it keeps
its regions marked (``Carrier.source_write_failed``), so the resync puts the source's data back.

A write's payload buffer belongs to the NBD connection that received it; ``release_payload``
hands it back (for the next request) once the disk and every target are done with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from volkeeper.core.peer import wire as pw
from volkeeper.core.peer.wire import Buffer

if TYPE_CHECKING:
    from volkeeper.core.mirror_engine import Place
    from volkeeper.daemon.source.intent_writer import IntentWriter
    from volkeeper.io.intent_store import IntentStore


class Carrier(Protocol):
    """What an op needs of a mirror that ships it (daemon/source/mirror.py's ``Mirror``)."""

    @property
    def store(self) -> IntentStore: ...

    @property
    def intent(self) -> IntentWriter: ...

    @property
    def tracking(self) -> bool: ...

    @property
    def asynchronous(self) -> bool: ...

    def ship(self, op: Op) -> None: ...

    def release_durable(self, op: Op) -> None: ...

    def source_write_failed(self, op: Op, error: BaseException) -> None: ...


def _nothing(error: BaseException | None) -> None:
    return None


def _nothing_durable() -> None:
    return None


@dataclass(eq=False, slots=True)
class Op:
    command: str  # "write", "zero", "trim" or "flush"
    offset: int
    length: int
    payload: Buffer = b""
    fua: bool = False
    may_trim: bool = False
    extents: range = range(0)
    on_done: Callable[[BaseException | None], None] = _nothing
    mirrors: tuple[Carrier, ...] = ()  # the mirrors that ship it (those of its submission)
    parts: int = 0  # reply parts still owed (the local disk and each mirror)
    error: BaseException | None = None
    durable_parts: int = 0  # flush only: sides that have not yet made it durable
    on_durable: Callable[[], None] = _nothing_durable
    # flush only: mirror target -> where its FLUSH frame went (what ``release_durable`` names)
    places: dict[str, Place] | None = None
    recycle: Callable[[Buffer], None] | None = None  # takes the payload back for reuse
    holds: int = 0  # write with recycle: sides that may still read the payload

    def release_payload(self) -> None:
        """This side is done with the payload (written, or ACKed by the target).  A mirror
        whose link dropped never releases it: the closing socket may still be sending it."""
        if self.recycle is not None:
            self.holds -= 1
            if self.holds == 0:
                self.recycle(self.payload)

    def part_done(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.parts -= 1
        if self.parts == 0:
            self.on_done(self.error)

    def durable_done(self) -> None:
        self.durable_parts -= 1
        if self.durable_parts == 0:
            self.on_durable()

    @property
    def is_flush(self) -> bool:
        return self.command == "flush"


def frame_of(op: Op) -> pw.Frame:
    """The replication frame that carries ``op`` to a target."""
    if op.command == "write":
        return pw.Write(op.offset, op.payload, op.fua)
    if op.command == "zero":
        return pw.Zero(op.offset, op.length, fua=op.fua, may_trim=op.may_trim)
    if op.command == "trim":
        return pw.Trim(op.offset, op.length, fua=op.fua)
    return pw.Flush()
