"""What the GUI shows from the nodes' answers: Unknown (never a failure) when a node is away."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volkeeper.gui import board


@dataclass
class Link:
    name: str
    status: dict[str, Any] | None
    reachable: bool = True
    seen: float | None = 100.0
    address: str = "unix:/run/x.sock"
    error: str | None = None
    attempts: int = 0
    next_try: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def mirror(role: str, state: str, target: str = "beta:data1", **more: Any) -> dict[str, Any]:
    return {"job": "web", "source": "alpha:data1", "target": target, "role": role,
            "state": state, "mode": "sync", "resync": {"done_bytes": 0, "total_bytes": 0,
            "rate_bytes_per_s": 0, "eta_s": None}, **more}  # fmt: skip


def job(role: str, *mirrors: dict[str, Any], source_node: str = "alpha") -> dict[str, Any]:
    return {"name": "web", "description": "", "source_node": source_node, "role": role,
            "mirrors": list(mirrors)}  # fmt: skip


def volume(name: str, role: str = "standalone", size: int = 1 << 20, **more: Any) -> dict[str, Any]:
    return {"name": name, "role": role, "size": size, "sector_size": 512, "locked": None,
            "path": f"/srv/{name}.img", **more}  # fmt: skip


def status(node: str, jobs: list[dict[str, Any]], volumes: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:  # fmt: skip
    mirrors = [m for j in jobs for m in j["mirrors"]]
    return {"node": node, "jobs": jobs, "mirrors": mirrors, "volumes": volumes or []}


ALPHA = status("alpha", [job("source", mirror("source", "Mirroring"))])
BETA = status("beta", [job("target", mirror("target", "Mirroring", data_state="UpToDate"))])


def test_a_mirror_shows_what_its_source_says() -> None:
    (row,) = board.jobs([Link("alpha", ALPHA), Link("beta", BETA)], now=101.0)
    (shown,) = row.mirrors
    assert (shown.state, shown.known, shown.css) == ("Mirroring", True, "ok")
    assert shown.target_state is not None and shown.target_state["data_state"] == "UpToDate"
    assert row.state == "Mirroring" and row.source_known


def test_a_source_that_does_not_answer_makes_its_mirrors_unknown_with_the_last_state() -> None:
    links = [Link("alpha", ALPHA, reachable=False, seen=90.0), Link("beta", BETA)]
    (row,) = board.jobs(links, now=102.5)
    (shown,) = row.mirrors
    assert (shown.state, shown.css, shown.known) == ("Unknown", "unknown", False)
    assert shown.last_known == "Mirroring" and shown.seen_ago == 12.5
    assert row.state == "Unknown" and not row.source_known
    assert "bad" not in (shown.css, row.css)


def test_a_target_that_does_not_answer_leaves_the_state_known_and_its_data_unknown() -> None:
    pending = status("alpha", [job("source", mirror("source", "Resync pending"))])
    links = [Link("alpha", pending), Link("beta", BETA, reachable=False)]
    (shown,) = board.jobs(links, now=101.0)[0].mirrors
    assert (shown.state, shown.known, shown.target_state) == ("Resync pending", True, None)


def test_a_job_seen_only_on_its_target_is_unknown() -> None:
    links = [Link("alpha", None, reachable=False, seen=None), Link("beta", BETA)]
    (row,) = board.jobs(links, now=101.0)
    (shown,) = row.mirrors
    assert (shown.state, shown.last_known, shown.seen_ago) == ("Unknown", "Mirroring", None)
    assert row.source_node == "alpha"


def test_resync_progress_is_shown_only_while_known_and_resyncing() -> None:
    progress = {"done_bytes": 25, "total_bytes": 100, "rate_bytes_per_s": 5, "eta_s": 15}
    resyncing = status("alpha", [job("source", mirror("source", "Resyncing", resync=progress))])
    (shown,) = board.jobs([Link("alpha", resyncing)], now=101.0)[0].mirrors
    assert shown.resync_percent == 25.0
    (away,) = board.jobs([Link("alpha", resyncing, reachable=False)], now=101.0)[0].mirrors
    assert away.resync_percent is None


def test_the_intent_logs_bitmap_size_is_one_bit_per_region() -> None:
    log = {"region_bytes": 4096, "hot_extents": 0, "hot_extent_bytes": 4 << 20,
           "crash_resync_bound_bytes": 0}  # fmt: skip
    answer = status("alpha", [job("source", mirror("source", "Mirroring", intent_log=log))],
                    [volume("data1", size=(1 << 30) + 1)])  # fmt: skip
    (row,) = board.jobs([Link("alpha", answer)], now=101.0)
    assert row.source_size == (1 << 30) + 1
    assert row.bitmap_bytes(row.mirrors[0]) == 32 * 1024 + 1  # 262145 regions: 32769 bytes


def test_the_worst_state_is_the_jobs() -> None:
    two = status("alpha", [job("source", mirror("source", "Mirroring"),
                               mirror("source", "Broken", target="gamma:data1"))])  # fmt: skip
    assert board.jobs([Link("alpha", two)], now=101.0)[0].state == "Broken"


def test_usable_volumes_are_standalone_unlocked_large_enough_and_on_nodes_that_answer() -> None:
    alpha = status("alpha", [], [volume("data1"), volume("data2", role="source")])
    beta = status("beta", [], [volume("data1"), volume("small", size=1024),
                               volume("locked", locked="by hand"), volume("t", role="target"),
                               volume("big4k", sector_size=4096)])  # fmt: skip
    gamma = status("gamma", [], [volume("data1")])
    links = [Link("alpha", alpha), Link("beta", beta), Link("gamma", gamma, reachable=False)]
    sources = [(n, v["name"]) for n, v in board.usable_sources(links)]
    assert sources == [("alpha", "data1"), ("beta", "data1"), ("beta", "small"), ("beta", "big4k")]
    targets = board.usable_targets(links, "alpha", volume("data1"))
    assert [(n, v["name"]) for n, v in targets] == [("beta", "data1")]


def test_a_node_row_says_how_long_ago_and_when_it_tries_again() -> None:
    link = Link("alpha", status("alpha", [], [volume("data1", last_error="EIO on write")]),
                reachable=False, seen=90.0, error="connection refused", attempts=3,
                next_try=104.0)  # fmt: skip
    full = {"time": "2026-12-05T10:00:00.000Z", "type": "change", "object": "volume",
            "volume": "data1", "error": "disk full"}  # fmt: skip
    link.events = [full, {"type": "change", "seq": 2}]
    row = board.node(link, now=100.0)
    assert (row.css, row.seen_ago, row.retry_in, row.attempts) == ("unknown", 10.0, 4.0, 3)
    assert [e["error"] for e in row.errors] == ["EIO on write", "disk full"]


def test_events_are_described_with_their_causes_and_sorted_newest_first() -> None:
    older = {"seq": 1, "time": "2026-12-05T10:00:00.000Z", "type": "change", "object": "mirror",
             "job": "web", "target": "beta:data1", "was": "Mirroring", "state": "Resync pending",
             "cause": "target lost"}  # fmt: skip
    newer = {**older, "seq": 2, "time": "2026-12-05T10:00:01.500Z", "error": "EIO"}
    link = Link("alpha", ALPHA, events=[older, newer, {**older, "job": "other"}])
    found = board.job_events([link], "web")
    assert [e["seq"] for e in found] == [2, 1] and found[0]["node"] == "alpha"
    assert board.describe(older) == (
        "change mirror beta:data1 · Mirroring -> Resync pending · because: target lost"
    )
    assert board.describe(newer).endswith("error: EIO")
    assert board.event_time({"time": 5}) == 5.0 and board.event_time({"time": "junk"}) == 0.0
