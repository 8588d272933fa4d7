"""What one event of a mirror leads to: a batch of effects and the order they must happen in.

How this works: the mirror engine (core/mirror_engine.py) and its ledger (core/mirror_ledger.py)
take an event -- an application write to ship, an ACK, a lost link, a handshake, an
administrator's command -- and return one ``Ready``, as etcd's raft does.  The adapter
(daemon/source/mirror.py) carries it out in the order written on the class: that order is
the whole "intent before data" contract, stated once, here.  Fields the event did not set
stay empty (shared empty tuples: the hot path, an ACK of a write, fills two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_state import MirrorEvent, MirrorState
from volkeeper.core.peer import wire as pw

Token = TypeVar("Token")  # the adapter's op: opaque to the engine
Pin = TypeVar("Pin")  # what the adapter unpins in the activity log (an op's extents)


@dataclass(slots=True)
class Sent(Generic[Token, Pin]):
    """An application frame on the link, or handed to the sender."""

    token: Token
    pin: Pin
    command: str  # "write", "zero", "trim" or "flush"
    offset: int
    length: int
    owed: bool  # its reply waits for the ACK (sync mode when it was sent)
    size: int = 0  # payload bytes (for the async queue's limit)
    sent_at: float = 0.0

    @property
    def is_flush(self) -> bool:
        return self.command == "flush"


class Close(NamedTuple):
    """Drop the link (if open), first telling the target ``record`` (unasked) and ``goodbye``."""

    message: str
    goodbye: pw.GoodbyeReason | None = None
    record: pw.DataState | None = None


@dataclass(slots=True)
class Ready(Generic[Token, Pin]):
    """Effects of one event.  The adapter carries them out in this order -- the contract:

    0. ``generations``: the intent log's new generations, persisted before anything else
       (a write the target does not receive starts a new line of writes -- core/lineage.py
       -- and no such write may be answered before the log on disk says so);
    1. ``mark_all``: mark every region; ``mark``: byte ranges to mark -- at once, in memory;
    2. ``clear``: region runs (first, count) to clear: data the target ACKed and made durable;
    3. ``mark_all`` again: persist the intent log *before anything below* -- a target of
       another generation must receive nothing (a record, resync data) while the log on
       disk says less differs than does;
    4. ``release``: ops whose payload this mirror no longer needs;
    5. ``reply``: ops whose reply part this mirror pays now -- safe before the marks of 1 are
       persisted, because a marked op's activity-log extent stays pinned until step 7;
    6. ``durable_now``: flushes now durable on this target; ``unpin_now``: ops whose writes a
       durable FLUSH covers: unpin their extents;
    7. only once every mark made so far is on stable storage: unpin the extents of
       ``unpin_after_persist`` and count ``durable_after_persist`` flushes as durable on
       this target -- never before (intent before data: a crash must find every region
       that may differ marked or pinned);
    8. ``changes``: the state transitions made, (state before, event), to log and publish;
    9. ``send``: the application frame to put on the link; ``records``: data states the
       target must store (ACKs checked), in order -- INCONSISTENT precedes resync data;
    10. ``start_resync``: begin walking the marked regions;
    11. ``answer``: (sequence, errno) of a question an ACK answered;
    12. ``failure``: (errno, what) -- the target failed a frame (say so); ``close``: drop
        the link, last.
    """

    generations: Generations | None = None
    mark: Sequence[tuple[int, int]] = ()
    clear: Sequence[tuple[int, int]] = ()
    mark_all: bool = False
    release: Sequence[Token] = ()
    reply: Sequence[Token] = ()
    durable_now: Sequence[Token] = ()
    unpin_now: Sequence[Pin] = ()
    unpin_after_persist: Sequence[Pin] = ()
    durable_after_persist: Sequence[Token] = ()
    changes: Sequence[tuple[MirrorState, MirrorEvent]] = ()
    send: Sent[Token, Pin] | None = None
    records: Sequence[pw.DataState] = ()
    start_resync: bool = False
    answer: tuple[int, int] | None = None
    failure: tuple[int, str] | None = None
    close: Close | None = None

    @property
    def waits_for_persist(self) -> bool:
        return bool(self.unpin_after_persist or self.durable_after_persist)


NOTHING: Ready[Any, Any] = Ready()  # an event with no effect (never changed: all fields empty)
