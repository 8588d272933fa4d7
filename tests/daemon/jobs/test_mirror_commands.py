"""Commands on running mirrors: options and states the table refuses, with words that say why."""

from __future__ import annotations

import pytest

from volkeeper.core.mirror_state import MirrorState
from volkeeper.daemon.jobs.mirror_commands import check_command, check_options
from volkeeper.errors import Refusal

S = MirrorState


@pytest.mark.parametrize(
    ("action", "full", "checksum", "mark", "words"),
    [
        ("pause", True, False, False, "full and checksum go with resync"),
        ("resync", False, False, True, "mark with verify"),
        ("resync", True, True, False, "either full or checksum"),
        ("rewind", False, False, False, "unknown mirror command 'rewind'"),
    ],
)
def test_bad_options_are_refused(
    action: str, full: bool, checksum: bool, mark: bool, words: str
) -> None:
    with pytest.raises(Refusal, match=words) as refused:
        check_options(action, full, checksum, mark)
    assert refused.value.code == "bad_request"


@pytest.mark.parametrize(
    ("state", "action", "full", "words"),
    [
        (S.BROKEN, "continue", False, "cannot continue .* it is Broken"),
        (S.BROKEN, "resync", False, r"cannot resync \(without --full\)"),
        (S.PAUSED, "verify", False, "cannot verify .* it is Paused"),
        (S.RESYNC_PENDING, "verify", False, "cannot verify .* it is Resync pending"),
    ],
)
def test_commands_the_state_table_refuses(
    state: MirrorState, action: str, full: bool, words: str
) -> None:
    with pytest.raises(Refusal, match=words) as refused:
        check_command("web", "beta:data1", state, action, full)
    assert refused.value.code == "conflict"


@pytest.mark.parametrize(
    ("state", "action", "full"),
    [
        (S.BROKEN, "resync", True),
        (S.MIRRORING, "pause", False),
        (S.PAUSED, "continue", False),
        (S.RESYNCING, "verify", False),
        (S.MIRRORING, "break", False),
        (S.BROKEN, "break", False),
    ],
)
def test_commands_the_state_table_allows(state: MirrorState, action: str, full: bool) -> None:
    check_command("web", "beta:data1", state, action, full)
