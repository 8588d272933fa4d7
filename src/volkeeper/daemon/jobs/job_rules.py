"""What an administrator may ask of jobs, checked before anything is written or sent.

How this works: a ``JobRequest`` (API body, CLI options or a config ``[[job]]``) names
mirrors as ``MirrorRequest``s; ``check_mirrors`` turns them into ``MirrorRecord``s or raises
``Refusal`` naming the rule broken: the source is a volume of this node that is not a
mirror target here and not the source of another job; the target is on a known peer and
not already the target of a mirror (the target node checks its side when claimed); the
settings are valid.  (Commands on running mirrors are checked in
daemon/jobs/mirror_commands.py.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord, split_volume
from volkeeper.errors import Refusal


@dataclass(frozen=True)
class MirrorRequest:
    """One mirror an administrator asks for."""

    source: str  # NODE:VOLUME on this node
    target: str  # NODE:VOLUME on a peer
    settings: MirrorSettings = field(default_factory=MirrorSettings)


@dataclass(frozen=True)
class JobRequest:
    name: str
    mirrors: tuple[MirrorRequest, ...]
    description: str = ""
    confirm: bool = False  # the full resync overwrites the targets
    declared: bool = False  # from the config file: confirmed by being written there


@dataclass(frozen=True)
class NodeFacts:
    """What the rules need to know of the node."""

    name: str
    volumes: Iterable[str]
    peers: Iterable[str]
    is_target: Callable[[str], bool]


def check_mirrors(
    requests: tuple[MirrorRequest, ...],
    node: NodeFacts,
    records: Iterable[JobRecord],
    job: str | None = None,
) -> list[MirrorRecord]:
    """``job``: the job the mirrors are added to (its own source volume is fine)."""
    others = [record for record in records if record.name != job]
    taken = {m.target: f"job {r.name!r}" for r in records for m in r.mirrors}
    mirrors: list[MirrorRecord] = []
    for request in requests:
        source, target = request.source, request.target
        source_node, source_volume = split_volume(source, "source")
        target_node, target_volume = split_volume(target, "target")
        if source_node != node.name:
            raise Refusal(
                "bad_request", f"source {source} is not on this node ({node.name})",
                "send the request to the source node",
            )  # fmt: skip
        if source_volume not in node.volumes:
            raise Refusal("not_found", f"node {node.name} has no volume {source_volume!r}")
        if node.is_target(source_volume):
            raise Refusal("conflict", f"{source} is a mirror target; it cannot be a source too")
        if target_node not in node.peers:
            known = ", ".join(node.peers) or "none"
            raise Refusal("not_found", f"node {target_node!r} is not in [peers] (known: {known})")
        if target in taken:
            raise Refusal("conflict", f"{target} is already a target of {taken[target]}")
        owner = next(
            (r.name for r in others for m in r.mirrors if m.source_volume == source_volume), None
        )
        if owner is not None:
            raise Refusal(
                "conflict", f"{source} is already the source of job {owner!r}",
                f"add the target to that job: volkeeper job add-target {owner} --target {target}",
            )  # fmt: skip
        try:
            settings = request.settings.checked()
        except ValueError as exc:
            raise Refusal("bad_request", str(exc)) from None
        mirrors.append(MirrorRecord(source_volume, target_node, target_volume, settings))
        taken[target] = "this request"
    return mirrors
