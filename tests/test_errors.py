"""The error hierarchy: a refusal's stable code decides the control API's HTTP status."""

from __future__ import annotations

import pytest

from volkeeper.errors import Refusal, VolkeeperError


@pytest.mark.parametrize(
    ("code", "status"),
    [("bad_request", 400), ("not_found", 404), ("conflict", 409),
     ("confirmation_required", 412), ("unavailable", 503)],
)  # fmt: skip
def test_a_refusal_carries_its_code_message_hint_and_status(code: str, status: int) -> None:
    message, hint = "no job named 'web'", "volkeeper job list"
    refusal = Refusal(code, message, hint)
    assert isinstance(refusal, VolkeeperError)
    assert (refusal.code, str(refusal), refusal.hint) == (code, message, hint)
    assert refusal.http_status == status


def test_an_unknown_refusal_code_is_a_bug_caught_at_once() -> None:
    with pytest.raises(ValueError, match="unknown refusal code 'nope'"):
        Refusal("nope", "anything")
