"""The walks a mirror runs over its volume -- a resync and a verify -- as tasks, and their ends.

How this works: a mirror's ``Walks`` runs at most one resync (daemon/source/resync.py) and one
verify (daemon/source/verify.py) at a time, keeps the last verify's result for ``status``, and
carries each walk's end back to the mirror's engine through ``apply``: a finished resync moves
it to Mirroring (``MirrorEngine.resync_finished``), a resync that raised drops its link (the
mirror then reconnects instead of staying Resyncing), a verify that marked regions starts a
resync of them (``verify_marked``).  The mirror hands it what only a walk cares about: the
ACK of one of the resync's questions, a lost link, an application write a verify must know.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import structlog

from volkeeper.core.mirror_state import SENDING
from volkeeper.daemon.source.resync import Resync, ResyncHost
from volkeeper.daemon.source.verify import Verify, VerifyHost, VerifyResult
from volkeeper.errors import PeerError

if TYPE_CHECKING:
    from volkeeper.daemon.source.op import Op
    from volkeeper.daemon.source.sender import Sender
    from volkeeper.io.peer_link import PeerLink

log = structlog.get_logger("volkeeper.mirror")


class WalksHost(ResyncHost, VerifyHost, Protocol):
    """The mirror, as its walks need it."""


class Walks:
    def __init__(self, mirror: WalksHost) -> None:
        self.mirror = mirror
        self.resync: Resync | None = None
        self.verify: Verify | None = None  # running
        self.verified: VerifyResult | None = None  # the last verify's result
        self._resync_task: asyncio.Task[None] | None = None

    # -- resync -------------------------------------------------------------------------------

    def start_resync(self, link: PeerLink, sender: Sender, checksum: bool) -> None:
        """Walk the marked regions (the engine has asked the target to record INCONSISTENT)."""
        resync = self.resync = Resync(self.mirror, link, sender, checksum, self._resync_finished)
        self._resync_task = asyncio.create_task(resync.run())
        self._resync_task.add_done_callback(lambda task: self._resync_ended(link, task))

    def _resync_ended(self, link: PeerLink, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or not link.is_open:
            return
        error = task.exception()
        mirror = self.mirror
        log.error("resync failed", job=mirror.spec.job, error=repr(error))
        mirror.engine.note(f"resync failed: {error}")
        link.close(mirror.engine.last_error)

    def _resync_finished(self, resync: Resync) -> None:
        """Every chunk ACKed, durable and cleared; the target recorded UpToDate (its STATE
        ACKed) and that is persisted: the only way to Mirroring from a resync."""
        self.resync = None
        mirror = self.mirror
        mirror.apply(mirror.engine.resync_finished())
        sent = resync.shipped_bytes if resync.checksum else resync.done_bytes
        log.info("resync finished", job=mirror.spec.job, target=mirror.spec.target,
                 bytes=resync.done_bytes, checksum=resync.checksum, sent_bytes=sent)  # fmt: skip

    def answer(self, sequence: int, errno: int) -> None:
        """An ACK answered a question: the resync's (a FLUSH, a STATE) or a hash request."""
        resync = self.resync
        if not (resync is not None and resync.answer(sequence, errno)) and errno:
            self.mirror.comparer.failed(sequence, errno)

    def lost(self, reason: str, unsent: list[object]) -> None:
        """The link is gone; ``unsent``: what the sender still held."""
        if self.resync is not None:
            self.resync.lost(reason, unsent)
            self.resync = None
        self.mirror.comparer.lost(reason, unsent)

    # -- verify -------------------------------------------------------------------------------

    def start_verify(self, sender: Sender | None, mark: bool) -> VerifyResult:
        """Compare source and target while mirroring goes on; idempotent while one runs."""
        if self.verify is not None:
            return self.verify.result
        state = self.mirror.state
        if sender is None or state not in SENDING:
            raise PeerError(f"the mirror is {state.value}: verify needs a connected target")
        verify = self.verify = Verify(self.mirror, sender, mark)
        task = asyncio.ensure_future(verify.run())
        task.add_done_callback(self._verified)
        return verify.result

    def note_write(self, op: Op) -> None:
        """An application write is going out: a verify's chunk it overlaps proves nothing."""
        if self.verify is not None and not op.is_flush:
            self.verify.note_race(op)

    def _verified(self, task: asyncio.Future[VerifyResult]) -> None:
        verify, self.verify = self.verify, None
        if verify is None:
            return
        self.verified = verify.result
        if task.cancelled() or task.exception() is not None:
            self.verified.error = self.verified.error or "verify stopped"
            return
        if verify.result.mark and verify.result.differing_bytes:
            self.mirror.apply(self.mirror.engine.verify_marked())
