"""A target's watch over a mirror session: close it once its pinging source goes silent.

How this works: a mirror's source PINGs its target all along (daemon/source/mirror.py, the
first one at once).  ``watch_silence`` looks at the link every ``MAX_PING_INTERVAL`` at most,
by the sequence number of the last frame received (receiving costs nothing more), and closes
it, with a log line, once the source has pinged (``pinged()``) and then sent nothing at all
for ``silence_limit(peer_timeout)``.  A source cut off by a partition, or gone with its host,
leaves a half-open connection that would otherwise hold the volume -- and have the source's
next HELLO refused as BUSY -- for ever.  The short sessions that claim, release or hand over
a volume (daemon/source/peer_session.py) never PING and may wait in silence for an answer,
so they are never closed this way.  Nor is a link the target holds (it stopped reading it:
io/limits.py ``peer_queued_bytes``): its silence is ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from volkeeper.core.mirror_engine import MAX_PING_INTERVAL
from volkeeper.io.peer_link import PeerLink

log = structlog.get_logger("volkeeper.target")


def silence_limit(peer_timeout: float) -> float:
    """Seconds a pinging source may say nothing before its session is closed: the node's
    ``peer_timeout``, but never less than two of a source's longest ping interval, so a
    source with a longer timeout of its own (pinging every 2 s) is never cut off."""
    return max(peer_timeout, 2 * MAX_PING_INTERVAL)


def watch_silence(
    link: PeerLink, peer_timeout: float, pinged: Callable[[], bool], **names: str
) -> None:
    """Watch ``link`` until it closes; ``names`` (volume, mirror) go into the log line."""
    loop = asyncio.get_running_loop()
    limit = silence_limit(peer_timeout)
    every = min(MAX_PING_INTERVAL, limit / 4)
    last, since = link.last_received, loop.time()  # the last frame seen, first seen then

    def check() -> None:
        nonlocal last, since
        if not link.is_open:
            return
        now = loop.time()
        if link.last_received != last or link.held:  # held: we are not listening
            last, since = link.last_received, now
        elif pinged() and now - since >= limit:
            log.warning(
                "mirror source silent: session dropped", **names,
                silent_s=round(now - since, 1), peer_timeout=peer_timeout,
            )  # fmt: skip
            link.close(f"source silent for {limit:g} s (peer_timeout)")
            return
        loop.call_later(every, check)

    loop.call_later(every, check)
