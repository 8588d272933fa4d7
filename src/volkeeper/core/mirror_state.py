"""Mirror states as users see them, and the table of what moves a mirror between them.

How this works: a mirror is always in one of DataKeeper's states (names kept exactly).  Events
come from the replication engine and the administrator; ``next_state(state, event)`` looks the
pair up in ``TRANSITIONS`` and raises ``IllegalTransition`` (with both names) for a pair the
table does not list, so an impossible move is a loud bug or a refused command, never a silent
state.  The table is the spec; read it as "in STATE, on EVENT, go to STATE'".

``Unknown`` is not a state of the table: management shows it when a node cannot be asked.

Where an application write goes follows from the state too, and is written once here
(``route``): on the wire while a link is up and the mirror is sending; into the intent log's
bitmap otherwise (no link, paused, or an async queue that is full, which also starts a
resync); nowhere when the mirror is Broken (changes are not tracked).  What a handshake
leads to is written here as well (``admission``): the resync the target needs, decided from
the generations and data state it reported and what the intent log has marked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from volkeeper.core.intent_log_format import Generations
from volkeeper.core.lineage import Relation, relation


class MirrorState(enum.Enum):
    MIRRORING = "Mirroring"
    RESYNCING = "Resyncing"
    RESYNC_PENDING = "Resync pending"
    PAUSED = "Paused"
    BROKEN = "Broken"
    SPLIT_BRAIN = "Split brain"  # both copies took writes the other lacks: the administrator
    # chooses the one to keep (a copy of a job's source moved while this one kept going)


class MirrorEvent(enum.Enum):
    CONNECTED_DIRTY = "connected, regions to resync"  # handshake done, bitmap not empty
    CONNECTED_CLEAN = "connected, nothing to resync"
    RESYNC_DONE = "resync finished"
    DISCONNECTED = "target lost"
    QUEUE_OVERFLOW = "async queue full"  # async mode: fall back to tracking + resync
    PAUSE = "pause"
    CONTINUE = "continue"
    BREAK = "break"
    FULL_RESYNC = "full resync requested"
    CHECKSUM_RESYNC = "checksum resync requested"  # every region compared, the differing sent
    VERIFY_MARKED = "verify marked differing regions"
    SOURCE_WRITE_FAILED = "source disk failed a write"  # the target may hold what it lacks
    SPLIT_BRAIN_FOUND = "split brain found"  # the target is a source too, of another line
    RESOLVED = "split brain resolved"  # the other side gave up its changes


class IllegalTransition(ValueError):
    def __init__(self, state: MirrorState, event: MirrorEvent) -> None:
        super().__init__(f"a mirror in state {state.value!r} cannot take {event.value!r}")
        self.state, self.event = state, event


S, E = MirrorState, MirrorEvent

TRANSITIONS: dict[tuple[MirrorState, MirrorEvent], MirrorState] = {
    # Resync pending: the target is away; writes are marked; the source keeps reconnecting.
    (S.RESYNC_PENDING, E.CONNECTED_DIRTY): S.RESYNCING,
    (S.RESYNC_PENDING, E.CONNECTED_CLEAN): S.MIRRORING,
    (S.RESYNC_PENDING, E.DISCONNECTED): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.QUEUE_OVERFLOW): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.PAUSE): S.PAUSED,
    (S.RESYNC_PENDING, E.BREAK): S.BROKEN,
    (S.RESYNC_PENDING, E.FULL_RESYNC): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.CHECKSUM_RESYNC): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.VERIFY_MARKED): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.SOURCE_WRITE_FAILED): S.RESYNC_PENDING,
    (S.RESYNC_PENDING, E.SPLIT_BRAIN_FOUND): S.SPLIT_BRAIN,
    # Resyncing: marked regions stream to the target while new writes are mirrored.
    (S.RESYNCING, E.RESYNC_DONE): S.MIRRORING,
    (S.RESYNCING, E.DISCONNECTED): S.RESYNC_PENDING,
    (S.RESYNCING, E.QUEUE_OVERFLOW): S.RESYNCING,
    (S.RESYNCING, E.PAUSE): S.PAUSED,
    (S.RESYNCING, E.BREAK): S.BROKEN,
    (S.RESYNCING, E.FULL_RESYNC): S.RESYNCING,
    (S.RESYNCING, E.CHECKSUM_RESYNC): S.RESYNCING,
    (S.RESYNCING, E.VERIFY_MARKED): S.RESYNCING,
    (S.RESYNCING, E.SOURCE_WRITE_FAILED): S.RESYNCING,
    # Mirroring: every write reaches the target.
    (S.MIRRORING, E.DISCONNECTED): S.RESYNC_PENDING,
    (S.MIRRORING, E.QUEUE_OVERFLOW): S.RESYNCING,
    (S.MIRRORING, E.PAUSE): S.PAUSED,
    (S.MIRRORING, E.BREAK): S.BROKEN,
    (S.MIRRORING, E.FULL_RESYNC): S.RESYNCING,
    (S.MIRRORING, E.CHECKSUM_RESYNC): S.RESYNCING,
    (S.MIRRORING, E.VERIFY_MARKED): S.RESYNCING,
    (S.MIRRORING, E.SOURCE_WRITE_FAILED): S.RESYNCING,
    # Paused by the administrator: writes are marked, nothing is sent.
    (S.PAUSED, E.CONTINUE): S.RESYNC_PENDING,
    (S.PAUSED, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.DISCONNECTED): S.PAUSED,
    (S.PAUSED, E.BREAK): S.BROKEN,
    (S.PAUSED, E.FULL_RESYNC): S.RESYNC_PENDING,
    (S.PAUSED, E.CHECKSUM_RESYNC): S.RESYNC_PENDING,
    (S.PAUSED, E.VERIFY_MARKED): S.PAUSED,
    (S.PAUSED, E.SOURCE_WRITE_FAILED): S.PAUSED,
    # Broken: changes are not tracked; only a full resync repairs it.
    (S.BROKEN, E.BREAK): S.BROKEN,
    (S.BROKEN, E.DISCONNECTED): S.BROKEN,
    (S.BROKEN, E.FULL_RESYNC): S.RESYNC_PENDING,
    (S.BROKEN, E.CHECKSUM_RESYNC): S.RESYNC_PENDING,
    # Split brain: writes are marked; nothing is sent until the administrator keeps a side.
    (S.SPLIT_BRAIN, E.SPLIT_BRAIN_FOUND): S.SPLIT_BRAIN,
    (S.SPLIT_BRAIN, E.RESOLVED): S.RESYNC_PENDING,
    (S.SPLIT_BRAIN, E.DISCONNECTED): S.SPLIT_BRAIN,
    (S.SPLIT_BRAIN, E.PAUSE): S.PAUSED,
    (S.SPLIT_BRAIN, E.BREAK): S.BROKEN,
    (S.SPLIT_BRAIN, E.SOURCE_WRITE_FAILED): S.SPLIT_BRAIN,
}


def next_state(state: MirrorState, event: MirrorEvent) -> MirrorState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


SENDING = frozenset({MirrorState.MIRRORING, MirrorState.RESYNCING})  # the link carries writes


class Route(enum.Enum):
    SEND = "send"  # on the wire
    OVERFLOW = "overflow"  # async queue full: QUEUE_OVERFLOW, then kept like KEEP
    KEEP = "keep"  # marked in the bitmap, sent by a later resync
    UNTRACKED = "untracked"  # Broken: nothing is tracked


def route(
    state: MirrorState,
    link_up: bool,
    asynchronous: bool,
    queued_bytes: int,
    size: int,
    is_flush: bool,
    queue_limit: int,
) -> Route:
    """Where an application op goes; ``queued_bytes``: async bytes sent and not ACKed."""
    if link_up and state in SENDING:
        if asynchronous and not is_flush and queued_bytes + size > queue_limit:
            return Route.OVERFLOW
        return Route.SEND
    return Route.UNTRACKED if state is MirrorState.BROKEN else Route.KEEP


@dataclass(frozen=True)
class Admission:
    """What a handshake with the target leads to."""

    mark_all: bool  # the target holds another generation: every region differs (full resync)
    event: MirrorEvent  # CONNECTED_DIRTY (resync, maybe empty) or CONNECTED_CLEAN
    why: str


def admission(
    generations: Generations, target_generation: int, target_up_to_date: bool, marked: bool
) -> Admission:
    """The target reported ``target_generation`` and whether it is UpToDate; ``marked``: the
    intent log has regions marked.  The target is only taken as in sync when it says so, for
    the current generation, and nothing is marked; one that holds the generation the current
    one grew from lacks only what is marked (a partial resync); any other needs everything.
    A resync that finds nothing marked is an empty one (it ends once the target has recorded
    UpToDate)."""
    found = relation(generations, Generations(target_generation))
    if found is Relation.BEHIND:
        return Admission(False, MirrorEvent.CONNECTED_DIRTY, "target behind: regions marked")
    if found is not Relation.SAME:
        return Admission(True, MirrorEvent.CONNECTED_DIRTY, "target generation unrelated")
    if marked:
        return Admission(False, MirrorEvent.CONNECTED_DIRTY, "regions marked")
    if not target_up_to_date:
        return Admission(False, MirrorEvent.CONNECTED_DIRTY, "target not UpToDate")
    return Admission(False, MirrorEvent.CONNECTED_CLEAN, "in sync")
