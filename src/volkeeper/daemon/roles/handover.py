"""What a switchover hands the new source: the job turned round, and where each mirror stands.

How this works: ``turned_round`` rewrites a job's record for a new source node: every source
volume of the job must have a mirror to that node (its copy there becomes the source
volume); the mirror to it is reversed (new source volume -> the old source volume), every
other mirror leaves from the new source to the same target; each keeps its settings, and
the others their administrator's word (a paused mirror stays paused).  Intent-log ids are
left empty: the new source makes its own logs.

A ``Handover`` carries that record and, per new mirror, the generations and marked regions
its intent log starts with: those of the old source's mirror to the same node.  For the
reversed mirror that is the old mirror to the new source, drained, so nothing is marked
and both copies hold the same generation (no resync); for another target, whatever its
old mirror still owed it (a resync that was running goes on from the new source).  Bitmap
images travel zlib-compressed and base64-encoded in the JSON of the HANDOVER frame
(core/peer/layout.py); ``from_json`` checks every field, strictly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import zlib
from dataclasses import dataclass

import pydantic

from volkeeper.core.intent_log_format import Generations
from volkeeper.daemon.jobs.job_record import JobRecord, MirrorRecord
from volkeeper.errors import Refusal


@dataclass(frozen=True)
class HandedMirror:
    target: str  # NODE:VOLUME, as in the turned-round record
    volume_size: int  # of the old source's volume: the new one must be as large, exactly
    current_generation: int
    previous_generation: int = 0
    marked: str = ""  # the bitmap image, zlib + base64; "" when nothing is marked

    @property
    def generations(self) -> Generations:
        return Generations(self.current_generation, self.previous_generation)

    def image(self, image_bytes: int) -> bytes:
        """The bitmap image (b"" when nothing is marked); ValueError unless it is one of
        ``image_bytes`` bytes."""
        if not self.marked:
            return b""
        try:
            image = zlib.decompress(base64.b64decode(self.marked, validate=True))
        except (binascii.Error, zlib.error) as exc:
            raise ValueError(f"marked regions of {self.target} undecodable: {exc}") from None
        if len(image) != image_bytes:
            raise ValueError(
                f"marked regions of {self.target}: {len(image)} bytes, not {image_bytes}"
            )
        return image


def packed_image(image: bytes) -> str:
    """A bitmap image as ``HandedMirror.marked`` carries it ("" when no bit is set)."""
    if not any(image):
        return ""
    return base64.b64encode(zlib.compress(image)).decode()


@dataclass(frozen=True)
class Handover:
    from_node: str
    job: JobRecord  # as the new source keeps it
    mirrors: tuple[HandedMirror, ...]

    def mirror(self, target: str) -> HandedMirror:
        found = next((m for m in self.mirrors if m.target == target), None)
        if found is None:
            raise ValueError(f"the handover says nothing of the mirror to {target}")
        return found

    def to_json(self) -> str:
        return _ADAPTER.dump_json(self).decode()

    @staticmethod
    def from_json(text: str) -> Handover:
        """Raises ValueError naming the first bad field."""
        try:
            return _ADAPTER.validate_json(text, strict=True)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            raise ValueError(f"handover {where}: {first['msg']}") from None


_ADAPTER = pydantic.TypeAdapter(Handover)


def turned_round(record: JobRecord, new_source: str) -> tuple[JobRecord, dict[str, str]]:
    """``record`` with ``new_source`` as its source node, and for each of its mirrors'
    targets the target of the old mirror whose place it takes; Refusal if it cannot be."""
    old_source = record.source_node
    to_new = [m for m in record.mirrors if m.target_node == new_source]
    copies = {m.source_volume: m for m in to_new}
    if len(copies) < len(to_new):
        raise Refusal(
            "conflict", f"job {record.name!r} has two copies of one volume on {new_source}: "
            "which would be the source is not clear",
            "delete one of those mirrors first",
        )  # fmt: skip
    if not copies:
        raise Refusal(
            "bad_request", f"job {record.name!r} has no mirror to node {new_source!r}",
            f"its mirrors go to {', '.join(m.target for m in record.mirrors)}",
        )  # fmt: skip
    missing = sorted({m.source_volume for m in record.mirrors} - copies.keys())
    if missing:
        raise Refusal(
            "conflict",
            f"job {record.name!r}: {', '.join(missing)} has no mirror to {new_source}, "
            f"so {new_source} cannot be the source of the whole job",
        )
    mirrors, places = [], {}
    for old in record.mirrors:
        source_volume = copies[old.source_volume].target_volume
        if old.target_node == new_source:  # reversed: back to the old source
            new = MirrorRecord(source_volume, old_source, old.source_volume, old.settings)
        else:
            new = MirrorRecord(
                source_volume, old.target_node, old.target_volume, old.settings, old.admin
            )
        mirrors.append(new)
        places[new.target] = old.target
    turned = dataclasses.replace(
        record, source_node=new_source, mirrors=tuple(mirrors), epoch=record.epoch + 1,
        demoted=False, declared=False,  # the config declares the old source: not this one
    )  # fmt: skip
    return turned, places
