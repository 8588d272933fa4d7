"""The control API's answers, as types: the JSON contract, published in /openapi.json.

How this works: the node builds its views as plain dicts (daemon/node.py, jobs.py,
mirror.py, targets.py); each route declares the model here as its ``response_model``, so
FastAPI checks every answer against it and the OpenAPI document describes it field by field.
Models forbid fields they do not declare, so a view that grows a key without its model fails
the tests instead of drifting from the document.  Fields only one side has (a source mirror's
intent log, a target's data state) are optional, and routes leave out what a view did not set
(``response_model_exclude_unset``), so the JSON stays as the views make it.  Error bodies
(every refusal, any HTTP status) are ``ErrorBody``: a stable code, a message, a hint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Number = int | float  # kept as the view made it: 0 stays 0, 1.5 stays 1.5


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResyncProgress(Model):
    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: Number
    eta_s: Number | None = Field(description="seconds to go at the current rate; null: unknown")


class IntentLogInfo(Model):
    region_bytes: int = Field(description="volume bytes per bitmap bit")
    hot_extents: int = Field(description="activity-log extents in use")
    hot_extent_bytes: int
    crash_resync_bound_bytes: int = Field(description="most a source crash can leave to resync")


class VerifyResult(Model):
    running: bool
    mark: bool = Field(description="differing regions are marked for resync")
    done_bytes: int
    total_bytes: int
    differing_bytes: int
    differing_offsets: list[int] = Field(description="the first differing offsets (at most 100)")
    unverified_bytes: int = Field(description="changed while compared, three times over")
    started: str | None
    finished: str | None
    error: str | None


class MirrorView(Model):
    """One mirror as this node sees it: as its source (everything) or its target (what the
    target knows; the rest is null: ask the source)."""

    job: str
    source: str = Field(description="NODE:VOLUME")
    target: str = Field(description="NODE:VOLUME")
    role: Literal["source", "target"]
    mode: str | None = Field(description="sync or async")
    state: str = Field(
        description="Mirroring, Resyncing, Resync pending, Paused, Broken, or Unknown when "
        "the state cannot be determined"
    )
    data_state: str | None = Field(None, description="target: UpToDate, Consistent, ...")
    out_of_sync_bytes: int | None
    sent_bytes: int | None
    may_lack_bytes: int | None = Field(
        None, description="target side, async: acknowledged writes it may lack, at most"
    )
    source_lost_at: float | None = Field(
        None, description="target side: when its source was last connected (unix time)"
    )
    resync_sent_bytes: int | None = Field(
        None, description="payload bytes resyncs sent since the node started (source side)"
    )
    wire_bytes: int | None
    compression_ratio: Number | None
    received_bytes: int | None = Field(None, description="target: payload bytes received")
    queue_bytes: int | None
    queue_limit_bytes: int | None
    lag_s: Number | None
    throughput_bytes_per_s: Number | None
    compression: str | None
    throttle: int | None
    resync_min: int | None = None
    resync_max: int | None = None
    resync: ResyncProgress
    intent_log: IntentLogInfo | None = None
    verify: VerifyResult | None = None
    checksum_resync: bool | None = Field(None, description="the next resync compares first")
    unlocked: bool | None = Field(None, description="target: writable by hand while paused")
    last_error: str | None
    target_errors: int = Field(0, description="frames the target failed to apply, ever")


class JobView(Model):
    name: str
    description: str
    source_node: str
    role: Literal["source", "target"]
    demoted: bool = Field(False, description="a source the cluster manager demoted: no writes")
    epoch: int = Field(0, description="how many times the job's source moved")
    declared: bool = Field(description="declared in the node config")
    mirrors: list[MirrorView]


class VolumeView(Model):
    name: str
    path: str
    kind: str = Field(description="file or block")
    size: int
    sector_size: int
    role: Literal["source", "target", "standalone"]
    locked: str | None = Field(description="why the volume is exported read-only, if it is")
    data_state: str | None = Field(
        None, description="UpToDate, Consistent, Inconsistent or Outdated; null: standalone"
    )
    generation: str | None = Field(None, description="the line of writes it holds (hex)")
    read_bytes: int
    written_bytes: int
    requests: dict[str, int]
    last_error: str | None


class PeerView(Model):
    name: str
    address: str
    link: Literal["pinned", "ca", "insecure", "unpinned"] = Field(
        description="pinned: TLS, its fingerprint pinned; ca: TLS, a site CA vouches; "
        "insecure: PLAIN TCP, unauthenticated (insecure = true); unpinned: refused until trusted"
    )
    fingerprint: str | None = Field(description="the fingerprint pinned for it, if any")


class Status(Model):
    """The stable document of ``volkeeper status --json``."""

    node: str
    identity: str = Field(description="this node's certificate fingerprint (sha256:...)")
    peers: list[PeerView]
    volumes: list[VolumeView]
    mirrors: list[MirrorView]
    jobs: list[JobView]


class Switchover(Model):
    job: str
    old_source: str = Field(description="this node: a target of the job now")
    new_source: str
    seconds: float = Field(description="from the request to the new source taking writes")
    mirrors: list[str] = Field(description="the new source's targets, NODE:VOLUME")


class MayLack(Model):
    bytes: int = Field(description="at most this much: the async mirror's queue limit")
    seconds_before: float | None = Field(
        description="writes acknowledged shortly before this time (unix) may be missing"
    )


class Promoted(Model):
    volume: str
    job: str
    old_source: str
    data_state: str = Field(description="UpToDate, or Consistent (async), as promoted")
    forced: bool
    generation: str = Field(description="the new generation this node starts (hex)")
    may_lack: MayLack | None = Field(description="async: what the copy may be missing")
    mirrors: list[str] = Field(description="the new source's targets, NODE:VOLUME")
    seconds: float


class Resolved(Model):
    job: str
    kept: str = Field(description="the node whose data stays")
    discarded: list[tuple[int, int]] = Field(description="(offset, length) overwritten")
    discarded_bytes: int


class Deleted(Model):
    deleted: str
    warnings: list[str] = Field(description="targets that could not be told, and why")


class ErrorDetail(Model):
    code: str = Field(description="stable: bad_request, not_found, conflict, ...")
    message: str
    hint: str


class ErrorBody(Model):
    error: ErrorDetail
