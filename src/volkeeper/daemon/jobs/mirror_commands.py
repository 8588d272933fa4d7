"""The administrator's commands on running mirrors: checked on every mirror first, then done.

How this works: ``Jobs.command`` (daemon/jobs/jobs.py) checks the options of a command
(``check_options``), then asks the state table, for every mirror it names, whether the mirror
may take it (``check_command``) -- so a command on several mirrors is refused before any of
them changed -- and only then runs it on each (``run_command``).
"""

from __future__ import annotations

from volkeeper.core.mirror_state import IllegalTransition, MirrorEvent, MirrorState, next_state
from volkeeper.daemon.source.mirror import Mirror
from volkeeper.errors import Refusal

ACTIONS = ("pause", "continue", "break", "resync", "verify")


def check_options(action: str, full: bool, checksum: bool, mark: bool) -> None:
    if ((full or checksum) and action != "resync") or (mark and action != "verify"):
        raise Refusal("bad_request", "full and checksum go with resync, mark with verify")
    if full and checksum:
        raise Refusal("bad_request", "resync either full or checksum, not both")
    if action not in ACTIONS:
        raise Refusal("bad_request", f"unknown mirror command {action!r}")


def check_command(job: str, target: str, state: MirrorState, action: str, full: bool) -> None:
    """Refuse ``action`` on a mirror in ``state`` if the state table does not allow it
    (``full``: a resync of every region, full or checksum)."""
    if action == "verify" and state not in (MirrorState.MIRRORING, MirrorState.RESYNCING):
        raise Refusal(
            "conflict",
            f"cannot verify the mirror of job {job!r} to {target}: it is {state.value}",
            "verify compares a connected target: wait for Mirroring (or continue the mirror)",
        )
    event = {"pause": MirrorEvent.PAUSE, "break": MirrorEvent.BREAK}.get(action)
    if action == "resync" and full:
        event = MirrorEvent.FULL_RESYNC
    elif action in ("continue", "resync") and state in (MirrorState.PAUSED, MirrorState.BROKEN):
        event = MirrorEvent.CONTINUE
    if event is None:
        return
    try:
        next_state(state, event)
    except IllegalTransition:
        what = "resync (without --full)" if action == "resync" else action
        raise Refusal(
            "conflict",
            f"cannot {what} the mirror of job {job!r} to {target}: it is {state.value}",
            "only `mirror resync --full` (or `--checksum`) repairs a Broken mirror",
        ) from None


async def run_command(mirror: Mirror, action: str, full: bool, checksum: bool, mark: bool) -> None:
    if action == "pause":
        mirror.pause()
    elif action == "break":
        mirror.break_()
    elif action == "resync" and full:
        await mirror.full_resync()
    elif action == "resync" and checksum:
        await mirror.checksum_resync()
    elif action == "verify":
        mirror.start_verify(mark)
    else:
        mirror.resume()
