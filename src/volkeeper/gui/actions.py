"""The GUI's actions on mirrors and jobs: what each does, when it is offered, how it is sent.

How this works: ``ACTIONS`` is a table.  Each ``Action`` says in words what will happen (shown
on the button and on the confirmation page), whether it asks for confirmation (where data can
be lost, or a copy is overwritten or abandoned), the mirror states it is offered in, and the
request it becomes -- always to the node that owns the decision: the job's source, or for a
promotion the target's own node.  ``request`` answers (node, method, path, body); the node's
answer, or its refusal verbatim, is what the GUI shows afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from volkeeper.gui.board import UNKNOWN, JobRow, MirrorRow

LIVE = ("Mirroring", "Resyncing", "Resync pending")
ANY_KNOWN = (*LIVE, "Paused", "Broken", "Split brain")


@dataclass(frozen=True)
class Action:
    name: str
    label: str
    explains: str  # str.format fields: job, source, target, target_node
    confirm: bool
    states: tuple[str, ...]
    scope: str = "mirror"  # mirror: one mirror; job: the whole job

    def explain(self, job: JobRow, mirror: MirrorRow | None) -> str:
        target = mirror.target if mirror else ", ".join(m.target for m in job.mirrors)
        source = mirror.source if mirror else (job.mirrors[0].source if job.mirrors else "?")
        node = mirror.target_node if mirror else ""
        return self.explains.format(job=job.name, source=source, target=target, target_node=node)

    def offered(self, mirror: MirrorRow) -> bool:
        return mirror.state in self.states


def _action(*args: Any, **kwargs: Any) -> tuple[str, Action]:
    action = Action(*args, **kwargs)
    return action.name, action


ACTIONS: dict[str, Action] = dict([
    _action("pause", "Pause",
            "Stop sending to {target}. Applications keep writing to {source}; every write is "
            "marked in the intent log, and Continue resyncs only what was marked.",
            False, LIVE),
    _action("continue", "Continue",
            "Reconnect to {target} and resync the regions marked while the mirror was paused.",
            False, ("Paused",)),
    _action("resync", "Resync",
            "Resend the regions the intent log marks to {target} (a partial resync).",
            False, ANY_KNOWN[:5]),
    _action("resync_checksum", "Checksum resync",
            "Compare every region of {source} and {target} by digest and send only the regions "
            "that differ. Both volumes are read whole; the target is Inconsistent until it ends.",
            False, ANY_KNOWN[:5]),
    _action("resync_full", "Full resync",
            "Resend every block of {source} to {target}, overwriting all of {target}. The "
            "target is Inconsistent until the resync ends: it cannot be promoted meanwhile.",
            True, ANY_KNOWN),
    _action("verify", "Verify",
            "Compare {source} and {target} by digest while mirroring. Differences are reported "
            "(and marked for resync); nothing else changes.",
            False, ("Mirroring",)),
    _action("break", "Break",
            "Stop tracking changes for {target}: the intent log forgets it, so only a full "
            "resync can repair this mirror. {target} keeps what it has now.",
            True, (*LIVE, "Paused")),
    _action("delete_mirror", "Delete mirror",
            "Stop mirroring {source} to {target} and forget the mirror. {target} is unlocked and "
            "keeps its data as it is now; it is no longer updated.",
            True, (*ANY_KNOWN,)),
    _action("switchover", "Switch over here",
            "Planned switchover: writes stop on {source} (clients in flight are answered, then "
            "disconnected), every mirror drains, and the copy on {target_node} becomes the "
            "source of job {job}. Applications must then use {target_node}'s export.",
            True, ("Mirroring",)),
    _action("promote", "Promote",
            "Failover: the source of job {job} cannot be reached, so {target} becomes the "
            "source. If the old source comes back it becomes a target; writes it took that "
            "{target} lacks are found as a split brain, never merged.",
            True, (UNKNOWN,)),
    _action("resolve_keep_source", "Keep source's data",
            "Resolve the split brain: {source}'s data stays; the changes made on {target} "
            "since the two diverged are overwritten.",
            True, ("Split brain",)),
    _action("delete_job", "Delete job",
            "Delete job {job}: every mirror stops ({target}); the targets are unlocked and keep "
            "their data as it is now.",
            True, (*ANY_KNOWN, UNKNOWN), scope="job"),
])  # fmt: skip


def request(
    action: Action, job: JobRow, mirror: MirrorRow | None, force: bool = False
) -> tuple[str, str, str, dict[str, Any] | None]:
    """(node, method, path, body) of ``action`` on ``mirror`` (or the whole job)."""
    name = quote(job.name, safe="")
    node = job.source_node
    target = mirror.target if mirror else None
    command = f"/jobs/{name}/mirror/"
    match action.name:
        case "pause" | "continue" | "resync" | "verify" | "break":
            return node, "POST", command + action.name, {"target": target}
        case "resync_checksum":
            return node, "POST", command + "resync", {"target": target, "checksum": True}
        case "resync_full":
            return node, "POST", command + "resync", {"target": target, "full": True}
        case "delete_mirror":
            return node, "DELETE", f"/jobs/{name}/mirror?target={quote(target or '')}", None
        case "switchover":
            assert mirror is not None
            return node, "POST", f"/jobs/{name}/switchover", {"to": mirror.target_node}
        case "promote":
            assert mirror is not None
            volume = quote(mirror.target.split(":", 1)[1], safe="")
            return mirror.target_node, "POST", f"/volumes/{volume}/promote", {"force": force}
        case "resolve_keep_source":
            return node, "POST", f"/jobs/{name}/resolve", {"keep": node}
        case "delete_job":
            return node, "DELETE", f"/jobs/{name}", None
    raise ValueError(f"no action named {action.name!r}")


def outcome(action: Action, answer: Any) -> str:
    """The node's answer to a successful action, in a line."""
    if action.name == "switchover" and isinstance(answer, dict):
        return f"switched over in {answer['seconds']:.2f} s: {answer['new_source']} is the source"
    if action.name == "promote" and isinstance(answer, dict):
        forced = " (forced)" if answer.get("forced") else ""
        return f"{answer['volume']} promoted{forced}: data {answer['data_state']}"
    if action.name == "delete_job" and isinstance(answer, dict):
        warnings = "; ".join(answer.get("warnings") or [])
        return f"job {answer['deleted']} deleted" + (f" (warnings: {warnings})" if warnings else "")
    if action.name == "resolve_keep_source" and isinstance(answer, dict):
        return f"split brain resolved: {answer['discarded_bytes']} bytes overwritten"
    return f"{action.label}: done"
