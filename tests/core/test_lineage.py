"""The relation of two copies from their generations: the table, and its symmetry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core.intent_log_format import Generations
from volkeeper.core.lineage import MIRRORED, Relation, relation, rotated

ids = st.integers(0, 4)  # few values: every coincidence of ids comes up
pairs = st.builds(Generations, ids, ids)


@given(pairs, pairs)
def test_the_relation_seen_from_the_other_side_is_its_mirror(
    a: Generations, b: Generations
) -> None:
    assert relation(b, a) is MIRRORED[relation(a, b)]


@given(pairs, pairs)
def test_the_table(a: Generations, b: Generations) -> None:
    found = relation(a, b)
    behind, ahead = b.current and b.current == a.previous, a.current and a.current == b.previous
    if b.current and b.current == a.current:
        assert found is Relation.SAME
    elif behind and ahead:
        assert found is Relation.UNRELATED
    elif b.current and b.current == a.previous:
        assert found is Relation.BEHIND
    elif a.current and a.current == b.previous:
        assert found is Relation.AHEAD
    elif a.previous and a.previous == b.previous:
        assert found is Relation.SPLIT_BRAIN
    else:
        assert found is Relation.UNRELATED


def test_the_stories_it_tells() -> None:
    g1 = Generations(11, 0)
    # the source took writes with its target away: the target is behind, a partial resync
    assert relation(rotated(g1, 12), g1) is Relation.BEHIND
    # a target promoted while its source was gone: the old source is behind the new one
    promoted = rotated(g1, 21)
    assert relation(promoted, g1) is Relation.BEHIND and relation(g1, promoted) is Relation.AHEAD
    # ... unless the old source took writes of its own meanwhile: split brain
    assert relation(promoted, rotated(g1, 12)) is Relation.SPLIT_BRAIN
    # a copy that never shared a generation, or knows none (0), is unrelated
    assert relation(g1, Generations(99, 98)) is Relation.UNRELATED
    assert relation(Generations(0, 0), Generations(0, 0)) is Relation.UNRELATED
