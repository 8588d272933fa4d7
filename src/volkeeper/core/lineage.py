"""How two copies of a volume are related, from their generations.

How this works: a copy's ``Generations`` (core/intent_log_format.py) are its ``current``
generation -- a random 64-bit id of the line of writes it holds -- and ``previous``, the
generation its current one grew from (0: none known).  A source starts a new generation
when it takes writes that no target of the mirror receives (the link is down: the first
such write rotates ``previous <- current <- new``), and a promoted target starts one for
the writes it takes as the new source.  Comparing one side's pair with the other's says,
as a table (first row that matches wins; 0 never matches anything):

    theirs.current == ours.current      SAME         the same line: only marked regions differ
    each grew from the other            UNRELATED    a cycle no real history makes: trust neither
    theirs.current == ours.previous     BEHIND       they stopped where we branched: they lack
                                                     what we marked since (a partial resync)
    ours.current == theirs.previous     AHEAD        we are the ones behind
    ours.previous == theirs.previous    SPLIT_BRAIN  both branched from one generation: both
                                                     took writes the other lacks
    (otherwise)                         UNRELATED    nothing in common: only a full resync

``relation(a, b)`` and ``relation(b, a)`` mirror each other (BEHIND <-> AHEAD, the rest
unchanged); tests/core/test_lineage.py checks that and the table for every combination.
"""

from __future__ import annotations

import enum

from volkeeper.core.intent_log_format import Generations


class Relation(enum.Enum):
    SAME = "same"
    BEHIND = "behind"  # the other copy is behind ours
    AHEAD = "ahead"  # the other copy is ahead of ours
    SPLIT_BRAIN = "split brain"
    UNRELATED = "unrelated"


MIRRORED = {
    Relation.SAME: Relation.SAME,
    Relation.BEHIND: Relation.AHEAD,
    Relation.AHEAD: Relation.BEHIND,
    Relation.SPLIT_BRAIN: Relation.SPLIT_BRAIN,
    Relation.UNRELATED: Relation.UNRELATED,
}


def relation(ours: Generations, theirs: Generations) -> Relation:
    """How the copy whose generations are ``theirs`` stands to ours (the table above)."""

    def same(a: int, b: int) -> bool:
        return a != 0 and a == b

    if same(theirs.current, ours.current):
        return Relation.SAME
    if same(theirs.current, ours.previous) and same(ours.current, theirs.previous):
        return Relation.UNRELATED
    if same(theirs.current, ours.previous):
        return Relation.BEHIND
    if same(ours.current, theirs.previous):
        return Relation.AHEAD
    if same(ours.previous, theirs.previous):
        return Relation.SPLIT_BRAIN
    return Relation.UNRELATED


def rotated(generations: Generations, new: int) -> Generations:
    """The generations after a new line of writes starts (``new``: a fresh random id)."""
    return Generations(new, generations.current)
