"""What a mirror is configured as, and what follows from it: its HELLO and its send settings.

How this works: a ``MirrorSpec`` is the frozen view of one mirror's job record entry plus the
target's address, built by ``Mirrors.spec`` from the record and replaced whole on a live
change (``Mirror.configure``).  ``hello_for`` is the HELLO that opens (or claims) a session
with its target; ``send_settings`` is what the link's ``Sender`` needs of the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.intent_log_format import Generations
from volkeeper.core.mirror_settings import MirrorSettings
from volkeeper.core.peer import wire as pw
from volkeeper.daemon.source.sender import SendSettings
from volkeeper.io.codecs import compressor_for
from volkeeper.io.volume_service import VolumeService


@dataclass(frozen=True)
class MirrorSpec:
    job: str
    source_volume: str
    target_node: str
    target_address: TcpAddress
    target_volume: str
    settings: MirrorSettings = field(default_factory=MirrorSettings)

    @property
    def target(self) -> str:
        return f"{self.target_node}:{self.target_volume}"


def hello_for(
    spec: MirrorSpec,
    node: str,
    service: VolumeService,
    generations: Generations,
    epoch: int,
    marked_bytes: int = 0,
    keep: bool = False,
) -> pw.Hello:
    """The HELLO that opens a session of ``spec``'s mirror with its target."""
    volume = service.volume
    return pw.Hello(
        node=node,
        volume=spec.target_volume,
        job=spec.job,
        source_volume=spec.source_volume,
        volume_size=volume.size,
        sector_size=volume.sector_size,
        current_generation=generations.current,
        previous_generation=generations.previous,
        epoch=epoch,
        marked_bytes=marked_bytes,
        keep=keep,
    )


def send_settings(settings: MirrorSettings) -> SendSettings:
    compressor = compressor_for(settings.compression)
    return SendSettings(compressor, settings.throttle, settings.resync_floor, settings.resync_max)
