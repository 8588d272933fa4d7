"""A mirror's settings: one value, its rules, its defaults, and the one derived default."""

from __future__ import annotations

import pytest

from volkeeper.core.mirror_settings import NAMES, MirrorSettings, parse_fields

MiB = 1 << 20


def test_defaults_are_a_valid_sync_mirror() -> None:
    settings = MirrorSettings().checked()
    assert settings == MirrorSettings()
    assert (settings.mode, settings.queue_limit, settings.region_size) == ("sync", 64 * MiB, 4096)
    assert NAMES == (
        "mode", "queue_limit", "compression", "throttle", "resync_min", "resync_max",
        "region_size",
    )  # fmt: skip


def test_from_text_parses_what_people_write() -> None:
    settings = MirrorSettings.from_text(
        mode="async", queue_limit="8MiB", compression=" ZSTD:03 ", throttle="100MiB/s",
        resync_min="none", resync_max=50 * MiB, region_size="64KiB",
    )  # fmt: skip
    assert settings == MirrorSettings(
        "async", 8 * MiB, "zstd:3", 100 * MiB, None, 50 * MiB, 64 * 1024
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "sometimes"}, "mode must be one of sync, async, got 'sometimes'"),
        ({"queue_limit": "512KiB"}, "queue limit must be at least 1 MiB"),
        ({"compression": "gzip"}, "compression: expected"),
        ({"throttle": "fast"}, "throttle: expected"),
        ({"throttle": 0}, "throttle: expected .* a rate must be positive"),
        ({"resync_min": "20MiB", "resync_max": "10MiB"}, "resync_min 20971520 is above"),
        ({"region_size": "6KiB"}, "region_size: region size must be a power of two"),
        ({"region_size": "2MiB"}, "region_size: region size must be a power of two"),
    ],
)
def test_each_rule_names_its_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MirrorSettings.from_text(**fields)


def test_a_live_change_is_checked_and_keeps_the_geometry() -> None:
    settings = MirrorSettings(region_size=65536)
    changed = settings.changed(mode="async", compression="LZ4", throttle=None)
    assert (changed.mode, changed.compression, changed.region_size) == ("async", "lz4", 65536)
    assert changed.live() == {
        "mode": "async", "queue_limit": 64 * MiB, "compression": "lz4", "throttle": None,
        "resync_min": None, "resync_max": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="region_size: cannot be changed on a mirror"):
        settings.changed(region_size=4096)
    with pytest.raises(ValueError, match="mode must be"):
        settings.changed(mode="later")


@pytest.mark.parametrize(
    ("throttle", "resync_min", "floor"),
    [(None, None, None), (100 * MiB, None, 10 * MiB), (100 * MiB, 30 * MiB, 30 * MiB),
     (None, 5 * MiB, 5 * MiB)],
)  # fmt: skip
def test_a_throttled_resync_gets_a_tenth_unless_told(
    throttle: int | None, resync_min: int | None, floor: int | None
) -> None:
    assert MirrorSettings(throttle=throttle, resync_min=resync_min).resync_floor == floor


def test_parse_fields_leaves_the_rest_alone() -> None:
    assert parse_fields({"mode": "async", "throttle": "off", "queue_limit": "2MiB"}) == {
        "mode": "async", "throttle": None, "queue_limit": 2 * MiB,
    }  # fmt: skip
