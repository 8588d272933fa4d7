"""Job records: JSON that round-trips, is refused by field, and is read in its older form."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord

RECORD = JobRecord(
    "web", "alpha",
    (MirrorRecord("data1", "beta", "data1", MirrorSettings("async", throttle=1000),
                  intent_log="00000000000000ff"),),
    "the web volumes",
)  # fmt: skip


def test_a_record_round_trips() -> None:
    assert JobRecord.from_json(RECORD.to_json()) == RECORD
    document = json.loads(RECORD.to_json())
    assert document["mirrors"][0]["settings"]["mode"] == "async"


def test_a_record_with_flat_settings_is_read() -> None:
    """As records were written before a mirror's settings were one value."""
    old = {
        "name": "web", "source_node": "alpha", "description": "the web volumes",
        "declared": False,
        "mirrors": [{
            "source_volume": "data1", "target_node": "beta", "target_volume": "data1",
            "mode": "async", "queue_limit": 67108864, "compression": "none", "throttle": 1000,
            "resync_min": None, "resync_max": None, "admin": "active",
            "intent_log": "00000000000000ff",
        }],
    }  # fmt: skip
    assert JobRecord.from_json(json.dumps(old)) == RECORD


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d["mirrors"][0]["settings"].update(throttle="fast"), "throttle"),
        (lambda d: d["mirrors"][0].update(admin=3), "admin"),
        (lambda d: d.update(mirrors="none"), "mirrors"),
    ],
)
def test_a_wrong_type_is_refused_by_field(
    change: Callable[[dict[str, Any]], object], where: str
) -> None:
    document = json.loads(RECORD.to_json())
    change(document)
    with pytest.raises(ValueError, match=where):
        JobRecord.from_json(json.dumps(document))


def test_not_a_record_is_refused() -> None:
    for text in ("[]", "{}", "not json"):
        with pytest.raises(ValueError):
            JobRecord.from_json(text)
