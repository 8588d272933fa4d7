"""Replication protocol frames of a session, not of the data: the handshake (HELLO, HELLO_OK,
REFUSE), liveness (PING, PONG), the end (GOODBYE), the target's records (STATE, JOB) and
role changes (HANDOVER, SWITCHOVER, MARKED).

How this works: one frozen dataclass per frame type (layouts in ``layout``), whose
``encode(sequence)`` returns the buffers to send, as in ``frames`` (the data frames, and the
``Frame`` union of all); decoding is in ``wire``, which re-exports both modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from volkeeper.core.peer.encoding import document, encoded_str, message_bytes, packed
from volkeeper.core.peer.layout import (
    HELLO_FIXED,
    HELLO_OK_FIXED,
    KEEP,
    MARKED_HEAD,
    MAX_HANDOVER,
    MAX_JOB_DOCUMENT,
    MAX_NAME,
    OWED,
    PROTOCOL_VERSION,
    REASON,
    STATE_BODY,
    TOKEN,
    Buffer,
    DataState,
    FrameType,
    GoodbyeReason,
    RefuseReason,
    Role,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.HELLO

    node: str
    volume: str
    job: str
    source_volume: str
    volume_size: int
    sector_size: int
    current_generation: int
    previous_generation: int
    role: Role = Role.SOURCE
    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    epoch: int = 0  # of the job: how many times its source moved
    marked_bytes: int = 0  # what the sender's intent log marks for this target
    keep: bool = False  # a split brain resolved keeping the sender's data

    def encode(self, sequence: int) -> list[Buffer]:
        body = HELLO_FIXED.pack(
            self.min_version, self.max_version, self.volume_size, self.sector_size,
            self.current_generation, self.previous_generation, self.role, self.epoch,
            self.marked_bytes,
        )  # fmt: skip
        names = (encoded_str(t, MAX_NAME, w) for t, w in self._names())
        return packed(self.TYPE, KEEP if self.keep else 0, sequence, body + b"".join(names))

    def _names(self) -> tuple[tuple[str, str], ...]:
        return (
            (self.node, "node name"),
            (self.volume, "volume name"),
            (self.job, "job name"),
            (self.source_volume, "source volume name"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloOk:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.HELLO_OK

    node: str
    volume: str
    volume_size: int
    sector_size: int
    current_generation: int
    previous_generation: int
    data_state: DataState
    chosen_version: int = PROTOCOL_VERSION
    owed: bool = False  # a MARKED frame follows

    def encode(self, sequence: int) -> list[Buffer]:
        body = HELLO_OK_FIXED.pack(
            self.chosen_version, self.volume_size, self.sector_size,
            self.current_generation, self.previous_generation, self.data_state,
        )  # fmt: skip
        names = encoded_str(self.node, MAX_NAME, "node name") + encoded_str(
            self.volume, MAX_NAME, "volume name"
        )
        return packed(self.TYPE, OWED if self.owed else 0, sequence, body + names)


@dataclass(frozen=True, slots=True)
class Refuse:
    """The target's answer to a HELLO it will not accept; ``message`` is for the log."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.REFUSE

    reason: RefuseReason
    message: str = ""

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(
            self.TYPE, 0, sequence, REASON.pack(self.reason) + message_bytes(self.message)
        )


@dataclass(frozen=True, slots=True)
class Ping:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.PING

    token: int

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(self.TYPE, 0, sequence, TOKEN.pack(self.token))


@dataclass(frozen=True, slots=True)
class Pong:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.PONG

    token: int

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(self.TYPE, 0, sequence, TOKEN.pack(self.token))


@dataclass(frozen=True, slots=True)
class Goodbye:
    @property
    def TYPE(self) -> FrameType:
        return FrameType.GOODBYE

    reason: GoodbyeReason
    message: str = ""

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(
            self.TYPE, 0, sequence, REASON.pack(self.reason) + message_bytes(self.message)
        )


@dataclass(frozen=True, slots=True)
class State:
    """The source tells the target what its copy now is; ACKed once durably recorded."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.STATE

    data_state: DataState
    current_generation: int
    previous_generation: int

    def encode(self, sequence: int) -> list[Buffer]:
        body = STATE_BODY.pack(self.data_state, self.current_generation, self.previous_generation)
        return packed(self.TYPE, 0, sequence, body)


@dataclass(frozen=True, slots=True)
class Job:
    """The job this mirror belongs to, as JSON (the target stores it; the source owns it)."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.JOB

    document: str

    def encode(self, sequence: int) -> list[Buffer]:
        return document(self.TYPE, sequence, self.document, MAX_JOB_DOCUMENT, "job document")


@dataclass(frozen=True, slots=True)
class Handover:
    """A switchover: the target's node becomes the job's source (JSON, see layout)."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.HANDOVER

    document: str

    def encode(self, sequence: int) -> list[Buffer]:
        return document(self.TYPE, sequence, self.document, MAX_HANDOVER, "handover document")


@dataclass(frozen=True, slots=True)
class SwitchoverRequest:
    """A target asks its source to hand the job over to it."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.SWITCHOVER

    def encode(self, sequence: int) -> list[Buffer]:
        return packed(self.TYPE, 0, sequence, b"")


@dataclass(frozen=True, slots=True)
class Marked:
    """Regions a deposed copy changed that its new source lacks (layout: MARKED)."""

    @property
    def TYPE(self) -> FrameType:
        return FrameType.MARKED

    region_size: int
    image: bytes  # zlib-compressed bitmap image

    def encode(self, sequence: int) -> list[Buffer]:
        if len(self.image) > MAX_HANDOVER:
            raise ValueError(f"marked regions of {len(self.image)} bytes exceed {MAX_HANDOVER}")
        return packed(self.TYPE, 0, sequence, MARKED_HEAD.pack(self.region_size) + self.image)


__all__ = [
    "Goodbye",
    "Handover",
    "Hello",
    "HelloOk",
    "Job",
    "Marked",
    "Ping",
    "Pong",
    "Refuse",
    "State",
    "SwitchoverRequest",
]
