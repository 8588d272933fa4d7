"""Jobs declared in the node config: the ``[[job]]`` and ``[[job.mirror]]`` tables.

How this works: a job is a named group of mirrors, each from a ``NODE:VOLUME`` source to a
``NODE:VOLUME`` target::

    [[job]]
    name = "db"
    description = "database volumes, kept on beta"   # optional, at most 1024 characters

    [[job.mirror]]
    source = "alpha:data1"
    target = "beta:data1"
    mode = "async"            # "sync" (the default) or "async"
    queue_limit = "64MiB"     # async: bytes sent and not yet acknowledged; at least 1 MiB
    region_size = "4KiB"      # intent-log bytes per bit: a power of two, 4 KiB to 1 MiB
    compression = "zstd:3"    # "none" (the default), "lz4", "zlib:N" or "zstd:N"
    throttle = "100MiB/s"     # bytes per second; unthrottled when absent
    resync_min = "10MiB/s"    # a resync's share under load (default: throttle / 10)
    resync_max = "80MiB/s"    # a resync's ceiling (default: none)

Scalars are checked as everywhere in the config (config_types.py). The rest is checked in
two steps. The structure holds for every job, whichever nodes it involves, so one shared jobs
list can be pasted into every node's file: one source node per job, a target on another node,
no job name twice, a volume the target of one mirror at most and never both a source and a
target, all mirrors of a source volume in one job. Jobs that involve this node must also fit
it: a source here needs its volume in ``[[volume]]`` and its target node in ``[peers]``; a
target here needs a writable ``[[volume]]``. The first step is ``JobConfig``'s own; the
second, and the checks across jobs, are ``check_jobs``, which config.py's ``NodeConfig`` calls
with what it knows of this node. Problems are ``KeyedProblems`` so each names its key.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated, Protocol

from pydantic import (
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from volkeeper.core.bitmap import MAX_REGION_SIZE, MIN_REGION_SIZE
from volkeeper.core.compression_setting import parse_compression
from volkeeper.core.mirror_settings import MIN_QUEUE_LIMIT, MODES, MirrorSettings
from volkeeper.core.mirror_settings import NAMES as settings_names
from volkeeper.core.units import parse_rate
from volkeeper.daemon.config.types import (
    NAME_RE,
    NAME_RULE,
    KeyedProblems,
    Name,
    Table,
    as_size,
    as_string,
    show,
)
from volkeeper.daemon.jobs.job_record import MAX_DESCRIPTION


def _volume_ref(value: object) -> str:
    text = as_string(value)
    node, colon, volume = text.partition(":")
    expected = f'expected NODE:VOLUME like "alpha:data1", got {show(value)}'
    if not colon:
        raise ValueError(expected)
    for what, name in (("node", node), ("volume", volume)):
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{expected}: the {what} name must be {NAME_RULE}")
    return text


def _queue_limit(value: object) -> int:
    size = as_size(value)
    if size < MIN_QUEUE_LIMIT:
        raise ValueError(f"must be at least 1 MiB ({MIN_QUEUE_LIMIT} bytes), got {size}")
    return size


def _region_size(value: object) -> int:
    size = as_size(value)
    if not MIN_REGION_SIZE <= size <= MAX_REGION_SIZE or size & (size - 1):
        raise ValueError(f"must be a power of two from 4 KiB to 1 MiB, got {size}")
    return size


def _rate(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'expected bytes per second or a rate like "100MiB/s", got {show(value)}')
    return parse_rate(value)


def _mode(value: object) -> str:
    mode = as_string(value).lower()
    if mode not in MODES:
        raise ValueError(f'must be "sync" or "async", got {show(value)}')
    return mode


def _description(value: object) -> str:
    text = as_string(value)
    if len(text) > MAX_DESCRIPTION:
        raise ValueError(f"must be at most {MAX_DESCRIPTION} characters, got {len(text)}")
    return text


def _compression(value: object) -> str:
    return parse_compression(as_string(value))


Description = Annotated[str, PlainValidator(_description)]
VolumeRef = Annotated[str, PlainValidator(_volume_ref)]
MirrorMode = Annotated[str, PlainValidator(_mode)]
QueueLimit = Annotated[int, PlainValidator(_queue_limit)]
RegionSize = Annotated[int, PlainValidator(_region_size)]
Compression = Annotated[str, PlainValidator(_compression)]
Rate = Annotated[int, PlainValidator(_rate)]


_DEFAULT = MirrorSettings()


class MirrorConfig(Table):
    """One ``[[job.mirror]]`` table: a source volume replicated to a volume on another node."""

    source: VolumeRef
    target: VolumeRef
    # The keys of core/mirror_settings.py's MirrorSettings, with its defaults, as TOML has them.
    mode: MirrorMode = _DEFAULT.mode
    queue_limit: QueueLimit = _DEFAULT.queue_limit
    region_size: RegionSize = _DEFAULT.region_size
    compression: Compression = _DEFAULT.compression
    throttle: Rate | None = None
    resync_min: Rate | None = None
    resync_max: Rate | None = None

    @field_validator("target")
    @classmethod
    def _on_another_node(cls, target: str, info: ValidationInfo) -> str:
        source = info.data.get("source")
        node = target.partition(":")[0]
        if source is not None and source.partition(":")[0] == node:
            raise ValueError(
                f"{target} is on the source's node {node}; a mirror's target is on another node"
            )
        return target

    _settings: MirrorSettings = PrivateAttr(default_factory=MirrorSettings)

    @model_validator(mode="after")
    def _settings_agree(self) -> MirrorConfig:
        """One MirrorSettings of the keys, checked: the rules between keys hold too."""
        fields = {name: getattr(self, name) for name in settings_names}
        self._settings = MirrorSettings(**fields).checked()
        return self

    @property
    def settings(self) -> MirrorSettings:
        return self._settings

    @property
    def source_node(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_volume(self) -> str:
        return self.source.partition(":")[2]

    @property
    def target_node(self) -> str:
        return self.target.partition(":")[0]

    @property
    def target_volume(self) -> str:
        return self.target.partition(":")[2]


class JobConfig(Table):
    """One ``[[job]]`` table: a named group of mirrors that all start from one source node."""

    name: Name
    description: Description = ""
    mirrors: list[MirrorConfig] = Field(alias="mirror")

    @field_validator("mirrors")
    @classmethod
    def _one_source_node(cls, mirrors: list[MirrorConfig]) -> list[MirrorConfig]:
        if not mirrors:
            raise ValueError("a job needs at least one [[job.mirror]]")
        first = mirrors[0].source_node
        first_target: dict[str, int] = {}
        problems = []
        for index, mirror in enumerate(mirrors):
            if mirror.source_node != first:
                problems.append((
                    f"[{index}].source",
                    "a job's mirrors all start from one node; "
                    f"mirror[{index}] starts from {mirror.source_node}, mirror[0] from {first}",
                ))  # fmt: skip
            seen = first_target.setdefault(mirror.target, index)
            if seen != index:
                problems.append((
                    f"[{index}].target",
                    f"{mirror.target} is already the target of mirror[{seen}]",
                ))  # fmt: skip
        if problems:
            raise KeyedProblems(problems)
        return mirrors

    @property
    def source_node(self) -> str:
        """The node all of this job's mirrors start from."""
        return self.mirrors[0].source_node


class DeclaredVolume(Protocol):
    """What the checks need of a ``[[volume]]`` table (config.py ``VolumeConfig``)."""

    @property
    def name(self) -> str: ...

    @property
    def read_only(self) -> bool: ...


def check_jobs(
    jobs: list[JobConfig],
    here: str | None,
    volumes: Sequence[DeclaredVolume] | None,
    peers: Collection[str] | None,
) -> None:
    """Check the jobs against each other and, if ``here`` (this node's name) is known,
    against this node's volumes and peers; ``None`` for what failed its own validation
    skips the checks that need it. Problems are raised as ``KeyedProblems``, relative to
    the jobs list."""
    index = _JobIndex(jobs)
    local = _LocalView(here, volumes, peers) if here is not None else None
    problems = []
    for job_index, job in enumerate(jobs):
        first = index.first_job[job.name]
        if first != job_index:
            problems.append((
                f"[{job_index}].name",
                f'job "{job.name}" is declared twice (job[{first}] and job[{job_index}])',
            ))  # fmt: skip
        for mirror_index, mirror in enumerate(job.mirrors):
            at = f"[{job_index}].mirror[{mirror_index}]"
            found = index.mirror_problems(job_index, f"job{at}", mirror)
            found += local.problems(mirror) if local else []
            problems += [(f"{at}.{key}", text) for key, text in sorted(found)]  # source first
    if problems:
        raise KeyedProblems(problems)


class _JobIndex:
    """The jobs of a file, indexed to find what two of them claim: names and volumes."""

    def __init__(self, jobs: list[JobConfig]) -> None:
        self.first_job: dict[str, int] = {}  # job name -> its first job index
        self.target_of: dict[str, str] = {}  # volume -> the first mirror with it as its target
        self.source_of: dict[str, tuple[int, str]] = {}  # volume -> (job, mirror) sourcing it
        for job_index, job in enumerate(jobs):
            self.first_job.setdefault(job.name, job_index)
            for index, mirror in enumerate(job.mirrors):
                at = f"job[{job_index}].mirror[{index}]"
                self.target_of.setdefault(mirror.target, at)
                self.source_of.setdefault(mirror.source, (job_index, at))

    def mirror_problems(
        self, job_index: int, at: str, mirror: MirrorConfig
    ) -> list[tuple[str, str]]:
        problems = []
        source, target = mirror.source, mirror.target
        if source in self.target_of:
            problems.append((
                "source",
                f"{source} is the target of {self.target_of[source]}; "
                "a volume cannot be both a source and a target",
            ))  # fmt: skip
        elif self.source_of[source][0] != job_index:
            problems.append((
                "source",
                f"{source} is already the source of {self.source_of[source][1]}; "
                "all mirrors of a volume belong to one job",
            ))  # fmt: skip
        if self.target_of[target] != at:
            problems.append((
                "target",
                f"{target} is already the target of {self.target_of[target]}; "
                "a volume is the target of one mirror at most",
            ))  # fmt: skip
        return problems


class _LocalView:
    """What a mirror involving this node needs from the rest of the file."""

    def __init__(
        self,
        here: str,
        volumes: Sequence[DeclaredVolume] | None,
        peers: Collection[str] | None,
    ) -> None:
        self.here = here
        self.volumes = None if volumes is None else {volume.name: volume for volume in volumes}
        self.peers = peers

    def problems(self, mirror: MirrorConfig) -> list[tuple[str, str]]:
        problems = []
        if mirror.source_node == self.here:
            if self.volumes is not None and mirror.source_volume not in self.volumes:
                problems.append(("source", self._undeclared(mirror.source_volume)))
            if self.peers is not None and mirror.target_node not in self.peers:
                known = ", ".join(self.peers) or "none"
                problems.append(
                    ("target", f'node "{mirror.target_node}" is not in [peers] (known: {known})')
                )
        if mirror.target_node == self.here and self.volumes is not None:
            volume = self.volumes.get(mirror.target_volume)
            if volume is None:
                problems.append(("target", self._undeclared(mirror.target_volume)))
            elif volume.read_only:
                problems.append((
                    "target",
                    f'volume "{volume.name}" is read_only; a mirror\'s target must be writable',
                ))  # fmt: skip
        return problems

    def _undeclared(self, volume: str) -> str:
        return f'this node ({self.here}) has no [[volume]] named "{volume}"'
