"""The new-job wizard: source volume, then one or two targets with their settings, then review.

How this works: the draft travels in the forms (hidden fields), so the wizard keeps no state
on the server and a reload or a second tab cannot mix two drafts up.  ``Draft.from_form`` reads
it back; ``next_step`` checks what the step just filled in against the volumes the nodes
report now (gui/board.py: only usable volumes are offered) and answers the step to show, with
the problem if it must show the same one again.  The review asks for a box per target that
names the volume to be overwritten; only with every box ticked does ``job_body`` become the
request to the source node -- whose refusal, if it refuses, the review shows verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import FormData

from volkeeper.gui import board

MODES = ("sync", "async")
COMPRESSIONS = ("none", "lz4", "zstd:3", "zstd:9", "zlib:6")
MAX_TARGETS = 2
STEPS = ("source", "targets", "review")


@dataclass
class TargetChoice:
    target: str = ""
    mode: str = "sync"
    compression: str = "none"
    throttle: str = ""


@dataclass
class Draft:
    name: str = ""
    description: str = ""
    source: str = ""
    targets: list[TargetChoice] = field(default_factory=list)
    overwrite: set[str] = field(default_factory=set)

    @classmethod
    def from_form(cls, form: FormData) -> Draft:
        def text(key: str) -> str:
            value = form.get(key)
            return value.strip() if isinstance(value, str) else ""

        targets = []
        for n in range(1, MAX_TARGETS + 1):
            choice = TargetChoice(
                text(f"target_{n}"), text(f"mode_{n}") or "sync",
                text(f"compression_{n}") or "none", text(f"throttle_{n}"),
            )  # fmt: skip
            if choice.target:
                targets.append(choice)
        ticked = {value for value in form.getlist("overwrite") if isinstance(value, str)}
        return cls(text("name"), text("description"), text("source"), targets, ticked)

    @property
    def source_node(self) -> str:
        return self.source.split(":", 1)[0]

    def source_volume(self, links: Sequence[board.Link]) -> dict[str, Any] | None:
        return next(
            (v for node, v in board.usable_sources(links) if f"{node}:{v['name']}" == self.source),
            None,
        )

    def next_step(self, go: str, links: Sequence[board.Link]) -> tuple[str, str]:
        """The step to show after button ``go``, and what is wrong if it is the same one."""
        if go in ("source", ""):
            return "source", ""
        if not self.name or any(c in self.name for c in "/?#%\\ ") or len(self.name) > 64:
            return "source", "give the job a name: letters, digits, - and _ (at most 64)"
        source = self.source_volume(links)
        if source is None:
            return "source", "choose a source volume from the list (only usable ones are shown)"
        if go == "targets":
            return "targets", ""
        usable = {
            f"{n}:{v['name']}" for n, v in board.usable_targets(links, self.source_node, source)
        }
        chosen = [choice.target for choice in self.targets]
        if not chosen:
            return "targets", "choose at least one target volume"
        if len(set(chosen)) != len(chosen):
            return "targets", "the two targets must be different volumes"
        if not set(chosen) <= usable:
            gone = ", ".join(sorted(set(chosen) - usable))
            return "targets", f"{gone} cannot be used now (in use, too small, or its node is away)"
        if go == "review":
            return "review", ""
        if go == "create" and self.overwrite >= set(chosen):
            return "create", ""
        return "review", "tick the box of every target: its data is overwritten"

    def job_body(self) -> tuple[str, dict[str, Any]]:
        """(the source node, the job request it gets)."""
        mirrors = [
            {"source": self.source, "target": c.target, "mode": c.mode,
             "compression": c.compression, **({"throttle": c.throttle} if c.throttle else {})}
            for c in self.targets
        ]  # fmt: skip
        body = {"name": self.name, "description": self.description, "mirrors": mirrors,
                "confirm": True}  # fmt: skip
        return self.source_node, body


def mirror_body(form: FormData, suffix: str) -> dict[str, Any]:
    """Mode, compression and throttle of one mirror, from fields named ``mode{suffix}``..."""
    body: dict[str, Any] = {}
    for key in ("mode", "compression", "throttle"):
        value = form.get(f"{key}{suffix}")
        if isinstance(value, str) and value.strip():
            body[key] = value.strip()
    return body
