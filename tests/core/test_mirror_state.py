"""The mirror state table: DataKeeper's names, legal moves, loud refusals."""

from __future__ import annotations

import pytest

from volkeeper.core.mirror_state import (
    TRANSITIONS,
    IllegalTransition,
    MirrorEvent,
    MirrorState,
    next_state,
)

S, E = MirrorState, MirrorEvent


def test_state_names_are_datakeepers() -> None:
    assert [s.value for s in S] == [
        "Mirroring",
        "Resyncing",
        "Resync pending",
        "Paused",
        "Broken",
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
