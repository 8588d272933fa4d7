"""The wizard's steps: each checks what was filled in against the volumes nodes report now."""

from __future__ import annotations

from starlette.datastructures import FormData

from tests.gui.test_board import Link, status, volume
from volkeeper.gui.wizard import Draft, mirror_body

LINKS = [
    Link("alpha", status("alpha", [], [volume("data1"), volume("data2")])),
    Link("beta", status("beta", [], [volume("data1"), volume("data2"), volume("tiny", size=8)])),
]


def draft(**fields: str) -> Draft:
    base = {"name": "web", "source": "alpha:data1", "target_1": "beta:data1",
            "mode_1": "async", "compression_1": "lz4", "throttle_1": "10MiB"}  # fmt: skip
    base.update(fields)
    items = [(k, v) for k, v in base.items() if k != "overwrite"]
    items += [("overwrite", v) for v in fields.get("overwrite", "").split(",") if v]
    return Draft.from_form(FormData(items))


def test_each_step_checks_what_it_was_given() -> None:
    assert draft().next_step("source", LINKS) == ("source", "")
    assert draft(name="").next_step("targets", LINKS)[1].startswith("give the job a name")
    assert draft(name="a/b").next_step("targets", LINKS)[1].startswith("give the job a name")
    assert "choose a source volume" in draft(source="gamma:data1").next_step("targets", LINKS)[1]
    assert draft().next_step("targets", LINKS) == ("targets", "")
    assert draft(target_1="").next_step("review", LINKS) == (
        "targets",
        "choose at least one target volume",
    )
    assert draft(target_2="beta:data1").next_step("review", LINKS)[1].startswith("the two")
    assert "cannot be used now" in draft(target_1="beta:tiny").next_step("review", LINKS)[1]
    assert "cannot be used now" in draft(target_1="alpha:data2").next_step("review", LINKS)[1]
    assert draft().next_step("review", LINKS) == ("review", "")


def test_nothing_is_created_until_every_target_is_confirmed_by_name() -> None:
    two = {"target_2": "beta:data2"}
    assert draft(**two).next_step("create", LINKS)[0] == "review"
    assert draft(**two, overwrite="beta:data1").next_step("create", LINKS)[0] == "review"
    confirmed = draft(**two, overwrite="beta:data1,beta:data2")
    assert confirmed.next_step("create", LINKS) == ("create", "")
    node, body = confirmed.job_body()
    assert node == "alpha" and body["confirm"] is True and body["name"] == "web"
    assert body["mirrors"] == [
        {"source": "alpha:data1", "target": "beta:data1", "mode": "async",
         "compression": "lz4", "throttle": "10MiB"},
        {"source": "alpha:data1", "target": "beta:data2", "mode": "sync", "compression": "none"},
    ]  # fmt: skip


def test_a_mirror_body_takes_only_what_was_filled_in() -> None:
    form = FormData([("mode", "async"), ("compression", " "), ("throttle", "5MiB")])
    assert mirror_body(form, "") == {"mode": "async", "throttle": "5MiB"}
