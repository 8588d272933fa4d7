"""The HANDOVER document: a job turned round for its new source, and what each mirror carries."""

from __future__ import annotations

import json

import pytest

from volkeeper.core.bitmap import DirtyBitmap
from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord
from volkeeper.daemon.roles.handover import HandedMirror, Handover, packed_image, turned_round
from volkeeper.errors import Refusal

ASYNC = MirrorSettings(mode="async", compression="zstd:3", throttle=1 << 20)
JOB = JobRecord(
    "web", "alpha",
    (
        MirrorRecord("data1", "beta", "copy1"),
        MirrorRecord("data1", "gamma", "data1", ASYNC, admin="paused"),
    ),
    "the web server", declared=True, epoch=4, demoted=True,
)  # fmt: skip


def test_a_job_turned_round_leaves_from_the_new_source_with_each_mirrors_settings() -> None:
    turned, places = turned_round(JOB, "beta")
    assert turned.source_node == "beta" and turned.epoch == 5
    assert not turned.demoted  # the new source takes writes
    assert not turned.declared  # its config declares no such job: a reload must not delete it
    assert turned.description == "the web server"
    assert turned.mirrors == (
        MirrorRecord("copy1", "alpha", "data1"),  # reversed, and active
        MirrorRecord("copy1", "gamma", "data1", ASYNC, admin="paused"),
    )
    assert places == {"alpha:data1": "beta:copy1", "gamma:data1": "gamma:data1"}


def test_turning_round_twice_is_the_job_again_one_epoch_on() -> None:
    there, _ = turned_round(JOB, "beta")
    back, _ = turned_round(there, "alpha")
    assert back.source_node == "alpha" and back.epoch == JOB.epoch + 2
    assert {m.target: m.settings for m in back.mirrors} == {
        "beta:copy1": MirrorSettings(), "gamma:data1": ASYNC,
    }  # fmt: skip


def test_a_node_without_a_copy_of_every_source_volume_cannot_be_the_source() -> None:
    with pytest.raises(Refusal, match="has no mirror to node 'delta'") as refused:
        turned_round(JOB, "delta")
    assert refused.value.code == "bad_request"
    two_volumes = JobRecord(
        "db", "alpha",
        (MirrorRecord("data1", "beta", "data1"), MirrorRecord("logs", "gamma", "logs")),
    )  # fmt: skip
    with pytest.raises(Refusal, match="logs has no mirror to beta"):
        turned_round(two_volumes, "beta")
    twice = JobRecord(
        "db", "alpha", (MirrorRecord("data1", "beta", "a"), MirrorRecord("data1", "beta", "b"))
    )
    with pytest.raises(Refusal, match="two copies of one volume on beta"):
        turned_round(twice, "beta")


def test_marked_regions_travel_as_a_compressed_image() -> None:
    bitmap = DirtyBitmap(64 << 20, 65536)
    assert packed_image(bitmap.to_bytes()) == ""  # nothing marked: nothing to carry
    bitmap.mark(5 << 20, 70000)
    bitmap.mark(63 << 20, 1)
    handed = HandedMirror("gamma:data1", 64 << 20, 7, 3, packed_image(bitmap.to_bytes()))
    assert handed.image(len(bitmap.to_bytes())) == bitmap.to_bytes()
    assert (handed.generations.current, handed.generations.previous) == (7, 3)
    with pytest.raises(ValueError, match="not 4"):
        handed.image(4)
    with pytest.raises(ValueError, match="undecodable"):
        HandedMirror("gamma:data1", 1, 7, 0, "not base64!").image(4)


def test_the_document_round_trips_and_a_bad_one_is_refused_naming_the_field() -> None:
    turned, _ = turned_round(JOB, "beta")
    handover = Handover("alpha", turned, (HandedMirror("alpha:data1", 64 << 20, 9),))
    assert Handover.from_json(handover.to_json()) == handover
    assert handover.mirror("alpha:data1").current_generation == 9
    with pytest.raises(ValueError, match="says nothing of the mirror to gamma:data1"):
        handover.mirror("gamma:data1")
    document = json.loads(handover.to_json())
    document["mirrors"][0]["current_generation"] = "9"
    with pytest.raises(ValueError, match=r"handover mirrors\.0\.current_generation"):
        Handover.from_json(json.dumps(document))
    with pytest.raises(ValueError, match="handover"):
        Handover.from_json("{")
