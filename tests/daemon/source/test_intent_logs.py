"""A source node's intent logs: made with an id the record keeps, opened with every check,
replaced (full resync, reason given) when they cannot be trusted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.daemon.jobs.job_record import MirrorRecord
from volkeeper.daemon.source.intent_logs import IntentLogs
from volkeeper.errors import VolumeError

MiB = 1 << 20
SIZE = 64 * MiB
MIRROR = MirrorRecord("data1", "beta", "data1", MirrorSettings(region_size=65536))
LEGACY = MirrorRecord("data1", "beta", "data1")  # a record older than log ids and region sizes


def made(tmp_path: Path) -> tuple[IntentLogs, MirrorRecord]:
    logs = IntentLogs(tmp_path / "bitmaps")
    store, named = logs.create("web", MIRROR, SIZE)
    store.bitmap.clear_all()
    store.close()
    return logs, named


def test_a_new_log_is_named_by_the_record(tmp_path: Path) -> None:
    logs, named = made(tmp_path)
    assert len(named.intent_log) == 16 and named == dataclasses.replace(
        MIRROR, intent_log=named.intent_log
    )
    opened = logs.open("web", named, SIZE)
    assert (opened.mirror, opened.notice) == (named, None)
    assert opened.store.mirror == "web: data1 -> beta:data1"
    assert opened.store.geometry.region_size == 65536
    opened.store.close()


def test_a_record_older_than_log_ids_adopts_its_log(tmp_path: Path) -> None:
    logs, named = made(tmp_path)
    opened = logs.open("web", LEGACY, SIZE)
    assert (opened.mirror, opened.notice) == (named, None)
    opened.store.close()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda path: path.write_bytes(b"\0" * 100), "shorter than its header block"),
        (lambda path: path.unlink(), "is missing"),
    ],
)
def test_an_untrusted_log_is_replaced_by_a_full_resync(
    tmp_path: Path, spoil: Callable[[Path], object], reason: str
) -> None:
    logs, named = made(tmp_path)
    path = logs.path("web", named.target)
    spoil(path)
    opened = logs.open("web", named, SIZE)
    assert opened.store.bitmap.marked_bytes == SIZE
    assert opened.mirror.intent_log not in ("", named.intent_log)
    assert opened.notice is not None and reason in opened.notice
    assert "a new intent log was made and a full resync started" in opened.notice
    kept = path.with_name(path.name + ".untrusted")
    assert kept.exists() == (reason != "is missing")
    assert opened.store.geometry.region_size == 65536  # the record's
    opened.store.close()
    again = logs.open("web", opened.mirror, SIZE)
    assert again.notice is None
    again.store.close()


def test_a_log_that_cannot_be_replaced_raises(tmp_path: Path) -> None:
    logs, named = made(tmp_path)
    path = logs.path("web", named.target)
    path.write_bytes(b"damaged")
    (path.with_name(path.name + ".untrusted") / "in-the-way").mkdir(parents=True)
    with pytest.raises(VolumeError, match=r"shorter than its header.*no new intent log could"):
        logs.open("web", named, SIZE)
