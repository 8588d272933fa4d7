"""The control API's answer types: what they accept, what they refuse, what the OpenAPI
document says of them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from volkeeper.daemon.api.api_models import ErrorBody, MirrorView, Status

SOURCE_MIRROR: dict[str, Any] = {
    "job": "web", "source": "alpha:data1", "target": "beta:data1", "role": "source",
    "mode": "sync", "state": "Mirroring", "out_of_sync_bytes": 0, "sent_bytes": 4096,
    "wire_bytes": 4096, "compression_ratio": 1.0, "queue_bytes": 0, "queue_limit_bytes": None,
    "lag_s": 0.0, "throughput_bytes_per_s": 0, "compression": "none", "throttle": None,
    "resync_min": None, "resync_max": None,
    "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
    "intent_log": {"region_bytes": 4096, "hot_extents": 1, "hot_extent_bytes": 4194304,
                   "crash_resync_bound_bytes": 4194304},
    "verify": None, "checksum_resync": False, "last_error": None, "target_errors": 0,
}  # fmt: skip
TARGET_MIRROR: dict[str, Any] = {
    "job": "web", "source": "alpha:data1", "target": "beta:data1", "role": "target",
    "mode": "sync", "state": "Mirroring", "data_state": "UpToDate", "out_of_sync_bytes": None,
    "sent_bytes": None, "wire_bytes": None, "compression_ratio": None, "received_bytes": 4096,
    "queue_bytes": None, "queue_limit_bytes": None, "lag_s": None,
    "throughput_bytes_per_s": None, "compression": "none", "throttle": None,
    "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
    "unlocked": False, "last_error": None, "target_errors": 0,
}  # fmt: skip


@pytest.mark.parametrize("view", [SOURCE_MIRROR, TARGET_MIRROR], ids=["source", "target"])
def test_both_sides_views_are_mirror_views_and_keep_their_shape(view: dict[str, Any]) -> None:
    model = MirrorView.model_validate(view)
    assert model.model_dump(exclude_unset=True) == view  # nothing added, nothing lost
    assert isinstance(model.model_dump()["resync"]["rate_bytes_per_s"], int)  # 0 stays 0


def test_a_key_the_model_does_not_declare_is_refused() -> None:
    with pytest.raises(ValidationError, match="surprise"):
        MirrorView.model_validate({**SOURCE_MIRROR, "surprise": 1})
    with pytest.raises(ValidationError, match="role"):
        MirrorView.model_validate({**SOURCE_MIRROR, "role": "bystander"})


def test_the_schema_names_the_fields_people_read() -> None:
    schema = Status.model_json_schema()
    mirror = schema["$defs"]["MirrorView"]["properties"]
    assert {"state", "out_of_sync_bytes", "last_error", "resync"} <= set(mirror)
    assert "Unknown" in mirror["state"]["description"]
    assert ErrorBody.model_json_schema()["$defs"]["ErrorDetail"]["required"] == [
        "code", "message", "hint",
    ]  # fmt: skip
