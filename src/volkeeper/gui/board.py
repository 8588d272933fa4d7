"""What the GUI shows, from what the nodes answered: jobs, mirrors, nodes, events.

How this works: pure functions over the fleet's links (their last answers, whether they answer
now, when they were seen) and ``now``.  A mirror's state is what its *source* node says; while
that node does not answer, the mirror is ``Unknown`` -- grey, never red -- with the last state
anyone reported and how long ago.  Everything else only one node can tell (a volume's role,
a target's data state) is Unknown the same way while that node is away.  A job seen only on
its targets (its source never answered this GUI) is shown from what the targets say, Unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

UNKNOWN = "Unknown"
STATE_CLASS = {
    "Mirroring": "ok",
    "Resyncing": "busy",
    "Resync pending": "warn",
    "Paused": "paused",
    "Broken": "bad",
    "Split brain": "bad",
    UNKNOWN: "unknown",
}


class Link(Protocol):
    @property
    def name(self) -> str: ...

    status: dict[str, Any] | None
    reachable: bool
    seen: float | None


@dataclass
class MirrorRow:
    job: str
    source: str
    target: str
    state: str
    known: bool  # the source answers now: the state is current
    last_known: str | None  # while Unknown: the last state reported
    seen_ago: float | None  # while Unknown: seconds since the source last answered
    view: dict[str, Any]  # the mirror as its source (or, failing that, a target) reported it
    target_state: dict[str, Any] | None = None  # the target node's own view, if it answers

    @property
    def css(self) -> str:
        return STATE_CLASS.get(self.state, "warn")

    @property
    def target_node(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def resync_percent(self) -> float | None:
        resync = self.view.get("resync") or {}
        total = resync.get("total_bytes") or 0
        if not total or not self.known or self.state not in ("Resyncing", "Resync pending"):
            return None
        return min(100.0, 100.0 * (resync.get("done_bytes") or 0) / total)


@dataclass
class JobRow:
    name: str
    description: str
    source_node: str
    source_known: bool
    source_volume: str | None
    mirrors: list[MirrorRow] = field(default_factory=list)
    demoted: bool = False
    source_size: int | None = None  # bytes of the source volume, if its node ever answered

    def bitmap_bytes(self, mirror: MirrorRow) -> int | None:
        """The size of ``mirror``'s intent-log bitmap: one bit per region of the volume."""
        log = mirror.view.get("intent_log")
        if not log or not self.source_size:
            return None
        regions = -(-self.source_size // int(log["region_bytes"]))
        return -(-regions // 8)

    @property
    def state(self) -> str:
        """The job's worst mirror state (Unknown when any mirror is)."""
        order = [UNKNOWN, "Split brain", "Broken", "Paused", "Resync pending", "Resyncing"]
        states = {m.state for m in self.mirrors}
        return next((s for s in order if s in states), "Mirroring" if states else UNKNOWN)

    @property
    def css(self) -> str:
        return STATE_CLASS.get(self.state, "warn")


def jobs(links: Sequence[Link], now: float) -> list[JobRow]:
    sources: dict[str, tuple[Link, dict[str, Any]]] = {}
    targets: dict[str, list[tuple[Link, dict[str, Any]]]] = {}
    for link in links:
        for job in (link.status or {}).get("jobs", []):
            if job["role"] == "source":
                held = sources.get(job["name"])
                if held is None or (link.reachable and not held[0].reachable):
                    sources[job["name"]] = (link, job)
            else:
                targets.setdefault(job["name"], []).append((link, job))
    rows = []
    for name in sorted(sources.keys() | targets.keys()):
        rows.append(_job(name, sources.get(name), targets.get(name, []), links, now))
    return rows


def job(links: Sequence[Link], name: str, now: float) -> JobRow | None:
    """The job named ``name``, as ``jobs`` shows it; None if no node tells of it."""
    return next((row for row in jobs(links, now) if row.name == name), None)


def _job(
    name: str,
    source: tuple[Link, dict[str, Any]] | None,
    targets: list[tuple[Link, dict[str, Any]]],
    links: Sequence[Link],
    now: float,
) -> JobRow:
    target_views = {
        m["target"]: m for link, job in targets if link.reachable for m in job["mirrors"]
    }
    if source is not None:
        link, job = source
        known = link.reachable and _answers(links, job["source_node"])
        mirrors = [
            _mirror(m, known, link.seen, now, target_views.get(m["target"])) for m in job["mirrors"]
        ]
    else:
        job = targets[0][1]
        seen = _seen(links, job["source_node"])
        mirrors = [
            _mirror(m, False, seen, now, target_views.get(m["target"]))
            for _, j in targets
            for m in j["mirrors"]
        ]
    volume = mirrors[0].source.split(":", 1)[1] if mirrors else None
    source_known = source is not None and source[0].reachable
    volumes = (source[0].status or {}).get("volumes", []) if source else []
    size = next((v["size"] for v in volumes if v["name"] == volume), None)
    return JobRow(
        name, job["description"], job["source_node"], source_known, volume, mirrors,
        bool(job.get("demoted")), size,
    )  # fmt: skip


def _answers(links: Sequence[Link], node: str) -> bool:
    return any(link.name == node and link.reachable for link in links)


def _seen(links: Sequence[Link], node: str) -> float | None:
    return next((link.seen for link in links if link.name == node), None)


def _mirror(
    view: dict[str, Any],
    known: bool,
    seen: float | None,
    now: float,
    target_view: dict[str, Any] | None,
) -> MirrorRow:
    if known:
        state, last_known, ago = view["state"], None, None
    else:
        state, last_known = UNKNOWN, view["state"]
        ago = None if seen is None else max(0.0, now - seen)
    return MirrorRow(
        view["job"], view["source"], view["target"], state, known, last_known, ago, view,
        target_view,
    )  # fmt: skip


@dataclass
class NodeRow:
    name: str
    address: str
    reachable: bool
    seen_ago: float | None
    error: str | None
    attempts: int
    retry_in: float | None
    volumes: list[dict[str, Any]]
    errors: list[dict[str, Any]]

    @property
    def css(self) -> str:
        return "ok" if self.reachable else "unknown"


class FullLink(Link, Protocol):
    address: Any
    error: str | None
    attempts: int
    next_try: float | None

    @property
    def events(self) -> Sequence[dict[str, Any]]: ...


def node(link: FullLink, now: float) -> NodeRow:
    status = link.status or {}
    seen_ago = None if link.seen is None else max(0.0, now - link.seen)
    retry_in = None if link.next_try is None else max(0.0, link.next_try - now)
    errors = [e for e in link.events if e.get("error") or e.get("type") == "gui"]
    for volume in status.get("volumes", []):
        if volume.get("last_error"):
            errors.append(
                {"time": link.seen, "volume": volume["name"], "error": volume["last_error"]}
            )
    for mirror in status.get("mirrors", []):
        if mirror.get("last_error"):
            errors.append(
                {"time": link.seen, "job": mirror["job"], "target": mirror["target"],
                 "error": mirror["last_error"]}
            )  # fmt: skip
    return NodeRow(
        link.name, str(link.address), link.reachable, seen_ago, link.error, link.attempts,
        retry_in, list(status.get("volumes", [])), errors[-30:][::-1],
    )  # fmt: skip


def event_time(event: dict[str, Any]) -> float:
    """An event's time as unix seconds: nodes stamp ISO 8601, the GUI's own notes a float."""
    stamp = event.get("time")
    if isinstance(stamp, int | float):
        return float(stamp)
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def job_events(links: Sequence[FullLink], job: str, limit: int = 60) -> list[dict[str, Any]]:
    """The job's events from every node, newest first, each with the node that told it."""
    found = [
        {**event, "node": link.name}
        for link in links
        for event in link.events
        if event.get("job") == job
    ]
    found.sort(key=lambda event: (event_time(event), event.get("seq", 0)), reverse=True)
    return found[:limit]


def describe(event: dict[str, Any]) -> str:
    """One line of an event log, in words."""
    if event.get("type") == "gui":
        return str(event.get("message"))
    what = event.get("object", "?")
    subject = event.get("target") or event.get("volume") or event.get("job") or ""
    parts = [f"{event.get('type')} {what} {subject}".strip()]
    if event.get("was") and event.get("state"):
        parts.append(f"{event['was']} -> {event['state']}")
    elif event.get("state"):
        parts.append(str(event["state"]))
    if event.get("cause"):
        parts.append(f"because: {event['cause']}")
    if event.get("error"):
        parts.append(f"error: {event['error']}")
    for key in ("role", "source_node", "demoted", "locked"):
        if key in event:
            parts.append(f"{key}: {event[key]}")
    return " · ".join(parts)


def usable_sources(links: Sequence[Link]) -> list[tuple[str, dict[str, Any]]]:
    """Volumes a new job can take as its source: standalone, unlocked, on a node that answers."""
    return [
        (link.name, volume)
        for link in links
        if link.reachable and link.status
        for volume in link.status["volumes"]
        if volume["role"] == "standalone" and not volume.get("locked")
    ]


def usable_targets(
    links: Sequence[Link], source_node: str, source: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Volumes that can be the source's targets: standalone on another node that answers, at
    least as large, with the same sector size."""
    return [
        (node_name, volume)
        for node_name, volume in usable_sources(links)
        if node_name != source_node
        and volume["size"] >= source["size"]
        and volume["sector_size"] == source["sector_size"]
    ]
