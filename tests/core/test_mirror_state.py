"""The mirror state table: DataKeeper's names, legal moves, loud refusals; where a write
goes in each state, and what a handshake leads to."""

from __future__ import annotations

import pytest

from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_state import (
    TRANSITIONS,
    IllegalTransition,
    MirrorEvent,
    MirrorState,
    Route,
    admission,
    next_state,
    route,
)

S, E = MirrorState, MirrorEvent


def test_state_names_are_datakeepers() -> None:
    assert [s.value for s in S] == [
        "Mirroring",
        "Resyncing",
        "Resync pending",
        "Paused",
        "Broken",
        "Split brain",  # DESIGN.md's name for diverged copies
    ]


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([E.CONNECTED_DIRTY, E.RESYNC_DONE], S.MIRRORING),
        ([E.CONNECTED_CLEAN, E.DISCONNECTED, E.CONNECTED_DIRTY], S.RESYNCING),
        ([E.CONNECTED_CLEAN, E.PAUSE, E.CONTINUE], S.RESYNC_PENDING),
        ([E.CONNECTED_CLEAN, E.BREAK, E.FULL_RESYNC, E.CONNECTED_DIRTY], S.RESYNCING),
        ([E.CONNECTED_CLEAN, E.QUEUE_OVERFLOW, E.RESYNC_DONE], S.MIRRORING),
    ],
)
def test_lifecycles(path: list[MirrorEvent], end: MirrorState) -> None:
    state = S.RESYNC_PENDING  # a new mirror waits for its target
    for event in path:
        state = next_state(state, event)
    assert state is end


def test_every_state_is_reachable_and_left() -> None:
    reached = {target for target in TRANSITIONS.values()}
    left = {state for state, _ in TRANSITIONS}
    assert reached == left == set(S)


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.BROKEN, E.CONTINUE), (S.BROKEN, E.CONNECTED_DIRTY), (S.MIRRORING, E.RESYNC_DONE)],
)
def test_illegal_moves_name_state_and_event(state: MirrorState, event: MirrorEvent) -> None:
    with pytest.raises(IllegalTransition, match=f"{state.value!r}.*{event.value!r}"):
        next_state(state, event)


def test_broken_is_left_only_by_a_resync_of_every_region() -> None:
    """Full, or by checksum: both consider every region, whatever the bitmap says."""
    exits = {event for (state, event), target in TRANSITIONS.items() if state is S.BROKEN}
    leaving = {e for e in exits if TRANSITIONS[(S.BROKEN, e)] is not S.BROKEN}
    assert leaving == {E.FULL_RESYNC, E.CHECKSUM_RESYNC}


@pytest.mark.parametrize(
    ("state", "link_up", "asynchronous", "queued", "is_flush", "way"),
    [
        (S.MIRRORING, True, False, 10**9, False, Route.SEND),  # sync: no queue limit
        (S.RESYNCING, True, False, 0, False, Route.SEND),  # new writes go during a resync
        (S.MIRRORING, True, True, 60, False, Route.SEND),
        (S.MIRRORING, True, True, 61, False, Route.OVERFLOW),  # 61 + 40 > 100
        (S.MIRRORING, True, True, 61, True, Route.SEND),  # a FLUSH never overflows
        (S.MIRRORING, False, False, 0, False, Route.KEEP),  # the link just dropped
        (S.RESYNC_PENDING, False, True, 0, False, Route.KEEP),
        (S.PAUSED, True, False, 0, False, Route.KEEP),  # paused: nothing is sent
        (S.BROKEN, False, False, 0, False, Route.UNTRACKED),
        (S.BROKEN, True, False, 0, True, Route.UNTRACKED),
    ],
)
def test_where_an_application_op_goes(
    state: MirrorState, link_up: bool, asynchronous: bool, queued: int, is_flush: bool, way: Route
) -> None:
    assert route(state, link_up, asynchronous, queued, 40, is_flush, 100) is way


@pytest.mark.parametrize(
    ("target_generation", "up_to_date", "marked", "mark_all", "event"),
    [
        (7, True, False, False, E.CONNECTED_CLEAN),  # in sync: Mirroring at once
        (7, True, True, False, E.CONNECTED_DIRTY),  # partial resync of what is marked
        (7, False, False, False, E.CONNECTED_DIRTY),  # empty resync: proves UpToDate first
        (8, True, False, True, E.CONNECTED_DIRTY),  # an unrelated generation: full resync
        (0, False, True, True, E.CONNECTED_DIRTY),  # a new target
        (6, True, True, False, E.CONNECTED_DIRTY),  # the one ours grew from: partial resync
        (6, True, False, False, E.CONNECTED_DIRTY),  # ... an empty one, to record the new one
    ],
)
def test_what_a_handshake_leads_to(
    target_generation: int, up_to_date: bool, marked: bool, mark_all: bool, event: MirrorEvent
) -> None:
    decided = admission(Generations(7, 6), target_generation, up_to_date, marked)
    assert (decided.mark_all, decided.event) == (mark_all, event)
    assert next_state(MirrorState.RESYNC_PENDING, decided.event) in (
        MirrorState.MIRRORING, MirrorState.RESYNCING,
    )  # fmt: skip
