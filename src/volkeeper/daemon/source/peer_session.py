"""Opening a session with a target node, and the short ones that claim or release a volume.

How this works: ``open_session`` dials the target, sends HELLO and waits for HELLO_OK (or
raises ``Refused`` carrying the target's REFUSE, or ``PeerError`` when it cannot be reached
or says nothing in time); after the answer, frames go to the caller's ``on_frame``.  A
mirror's connection starts this way (daemon/source/mirror.py), and so do the two short sessions
``Jobs`` needs when no mirror is connected:

    claim      HELLO claims and locks the volume on the target (every check of
               daemon/target/target_session.py runs there); the JOB frame then tells the
               target which job the volume serves, and its ACK says the target recorded it.
    release    HELLO, then GOODBYE(DELETED): the target forgets the claim and unlocks the
               volume, keeping its data.  Used when a job is deleted, or when creating it
               failed part way (so nothing is left half-created).
    hand over  HELLO, then HANDOVER (a switchover, daemon/roles/switchover.py): the
               target's ACK says it is the job's source now, on disk; its GOODBYE says
               why it will not be.  No answer leaves the outcome unknown (``Undecided``).

``claim_all`` claims several targets at once and, if any refuses or cannot be reached,
releases the others before raising; ``release_retrying`` tries a few times (a target may
still hold the mirror's last connection for a moment) and reports what stopped it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer import wire as pw
from volkeeper.errors import PeerError
from volkeeper.io.peer_link import OnFrame, OnLost, PeerLink, connect
from volkeeper.io.peer_trust import PeerTrust

HANDSHAKE_TIMEOUT = 10.0
HANDOVER_TIMEOUT = 30.0  # the new source makes intent logs and records: a few fsyncs
GOODBYE_GRACE = 0.05  # lets a GOODBYE leave before the close
RELEASE_ATTEMPTS = 3


@dataclass(frozen=True)
class Target:
    """A target volume to open a session with, and the HELLO that opens it."""

    address: TcpAddress
    node: str
    hello: pw.Hello

    @property
    def name(self) -> str:
        return f"{self.node}:{self.hello.volume}"


class Unreachable(PeerError):
    def __init__(self, target: str, why: str) -> None:
        super().__init__(f"cannot prepare {target}: {why}")
        self.target = target


class Refused(PeerError):
    def __init__(self, target: str, refusal: pw.Refuse) -> None:
        super().__init__(f"{target} refused: {refusal.message}")
        self.refusal = refusal


class Undecided(PeerError):
    """A HANDOVER was sent and never answered: the target may or may not be the source."""


async def open_session(
    address: TcpAddress,
    hello: pw.Hello,
    on_frame: OnFrame,
    on_lost: OnLost,
    *,
    trust: PeerTrust | None,
    peer_name: str,
) -> tuple[PeerLink, pw.HelloOk, pw.Marked | None]:
    """The open link, the HELLO_OK, and the MARKED frame that follows it when the target
    owes regions (it was deposed: they go into the mirror's resync)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[pw.HelloOk | pw.Refuse] = loop.create_future()
    owed: list[pw.HelloOk] = []  # a HELLO_OK whose MARKED frame is awaited
    marked: list[pw.Marked] = []

    def first(link: PeerLink, frame: pw.Frame) -> None:
        if owed and isinstance(frame, pw.Marked) and not answer.done():
            marked.append(frame)
            answer.set_result(owed.pop())
        elif not answer.done() and isinstance(frame, pw.HelloOk) and frame.owed and not owed:
            owed.append(frame)
        elif not answer.done() and not owed and isinstance(frame, pw.HelloOk | pw.Refuse):
            answer.set_result(frame)
        elif answer.done():
            on_frame(link, frame)
        else:
            link.close(f"expected HELLO_OK or MARKED, got {frame.TYPE.name}")

    def lost(link: PeerLink, reason: str) -> None:
        if not answer.done():
            answer.set_exception(PeerError(reason))
        on_lost(link, reason)

    link = await connect(address, first, lost, trust=trust, peer_name=peer_name)
    link.send(hello)
    try:
        result = await asyncio.wait_for(answer, HANDSHAKE_TIMEOUT)
    except BaseException:
        link.close("no answer to HELLO")
        raise
    if isinstance(result, pw.Refuse):
        link.close("refused")
        raise Refused(f"{peer_name}:{hello.volume}", result)
    return link, result, marked[0] if marked else None


async def claim(
    address: TcpAddress,
    target_node: str,
    hello: pw.Hello,
    job: pw.Job,
    *,
    trust: PeerTrust | None,
) -> PeerLink:
    """Claim the target volume for ``hello``'s mirror and record ``job`` there.  Returns
    the open link (the caller closes it, or releases the claim through it)."""
    loop = asyncio.get_running_loop()
    recorded: asyncio.Future[pw.Ack] = loop.create_future()
    sequence = 0

    def on_frame(link: PeerLink, frame: pw.Frame) -> None:
        if isinstance(frame, pw.Ack) and frame.sequence == sequence and not recorded.done():
            recorded.set_result(frame)

    def on_lost(link: PeerLink, reason: str) -> None:
        if not recorded.done():
            recorded.set_exception(PeerError(reason))

    link, _, _ = await open_session(
        address, hello, on_frame, on_lost, trust=trust, peer_name=target_node
    )
    sequence = link.send(job)
    try:
        ack = await asyncio.wait_for(recorded, HANDSHAKE_TIMEOUT)
    except BaseException:
        link.close("no answer to JOB")
        raise
    if ack.errno:
        link.close("JOB refused")
        raise PeerError(
            f"{target_node}:{hello.volume} could not record the job (errno {ack.errno})"
        )
    return link


async def hand_over(
    address: TcpAddress,
    target_node: str,
    hello: pw.Hello,
    handover: pw.Handover,
    *,
    trust: PeerTrust | None,
) -> PeerLink:
    """Make ``target_node`` the job's source; returns the open link once it ACKed (the
    caller closes it when its own side is done).  Raises ``Refused`` (HELLO refused),
    ``PeerError`` (unreachable, or the target said why not: nothing changed there) or
    ``Undecided`` (sent, never answered)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[pw.Ack | pw.Goodbye] = loop.create_future()
    sequence = 0

    def on_frame(link: PeerLink, frame: pw.Frame) -> None:
        if answer.done():
            return
        if isinstance(frame, pw.Goodbye) or (
            isinstance(frame, pw.Ack) and frame.sequence == sequence
        ):
            answer.set_result(frame)

    def on_lost(link: PeerLink, reason: str) -> None:
        if not answer.done():
            answer.set_exception(Undecided(f"{target_node} did not answer the handover: {reason}"))

    link, _, _ = await open_session(
        address, hello, on_frame, on_lost, trust=trust, peer_name=target_node
    )
    sequence = link.send(handover)
    try:
        result = await asyncio.wait_for(answer, HANDOVER_TIMEOUT)
    except TimeoutError:
        link.close("no answer to HANDOVER")
        raise Undecided(f"{target_node} did not answer the handover in time") from None
    if isinstance(result, pw.Goodbye):
        link.close("HANDOVER refused")
        raise PeerError(f"{target_node} refused to take over: {result.message}")
    if result.errno:
        link.close("HANDOVER failed")
        raise PeerError(f"{target_node} could not take over (errno {result.errno})")
    return link


async def say_goodbye(link: PeerLink, reason: pw.GoodbyeReason, message: str) -> None:
    if link.is_open:
        link.send(pw.Goodbye(reason, message))
        await asyncio.sleep(GOODBYE_GRACE)
        link.close(message)


async def release(
    address: TcpAddress,
    target_node: str,
    hello: pw.Hello,
    *,
    trust: PeerTrust | None,
    why: str,
) -> None:
    """Tell the target to forget the claim ``hello`` names (GOODBYE(DELETED))."""

    def ignore(link: PeerLink, what: object) -> None:
        return None

    link, _, _ = await open_session(
        address, hello, ignore, ignore, trust=trust, peer_name=target_node
    )
    await say_goodbye(link, pw.GoodbyeReason.DELETED, why)


async def claim_all(targets: list[Target], job: pw.Job, trust: PeerTrust | None) -> None:
    """Claim every target, or none: raises ``Refused`` or ``Unreachable`` (the first failure)
    after releasing the claims that succeeded."""

    async def one(target: Target) -> PeerLink:
        try:
            return await claim(target.address, target.node, target.hello, job, trust=trust)
        except Refused:
            raise
        except (PeerError, TimeoutError) as exc:
            raise Unreachable(target.name, str(exc) or "no answer") from exc

    results = await asyncio.gather(*(one(t) for t in targets), return_exceptions=True)
    links = [result for result in results if isinstance(result, PeerLink)]
    failures = [result for result in results if isinstance(result, BaseException)]
    if not failures:
        for link in links:
            link.close("target prepared")
        return
    for link in links:  # undo what did succeed: the target forgets the claim
        await say_goodbye(link, pw.GoodbyeReason.DELETED, "job creation failed")
    raise failures[0]


async def release_retrying(target: Target, trust: PeerTrust | None, why: str) -> str | None:
    """Release ``target``'s claim; None once done (or if another mirror holds it now),
    else what stopped it."""
    problem = "no attempt"
    for attempt in range(RELEASE_ATTEMPTS):
        try:
            await release(target.address, target.node, target.hello, trust=trust, why=why)
            return None
        except Refused as exc:
            if exc.refusal.reason == pw.RefuseReason.ALREADY_TARGET:
                return None  # it serves another mirror now: nothing of ours to release
            problem = str(exc)
        except (PeerError, TimeoutError) as exc:
            problem = str(exc) or "no answer"
        await asyncio.sleep(0.5 * (attempt + 1))
    return problem
