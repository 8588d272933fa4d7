"""What a walk over a mirror's volume -- a resync or a verify -- needs of its mirror.

How this works: ``Resync`` (resync.py) and ``Verify`` (verify.py) read the source volume range
by range, compare or send it, and must know which application writes raced them; they take
their ``Mirror`` (mirror.py) as the narrow protocol below, extended with what each needs on
top, so neither imports the mirror (no import loop) nor reaches into more of it than this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from volkeeper.daemon.source.compare import Comparer
    from volkeeper.daemon.source.intent_writer import IntentWriter
    from volkeeper.daemon.source.op import Op
    from volkeeper.io.intent_store import IntentStore
    from volkeeper.io.volume_service import VolumeService


class WalkHost(Protocol):
    in_flight_ops: Callable[[], Iterable[Op]]  # writes issued and not complete

    @property
    def store(self) -> IntentStore: ...

    @property
    def service(self) -> VolumeService: ...

    @property
    def intent(self) -> IntentWriter: ...

    @property
    def comparer(self) -> Comparer: ...
