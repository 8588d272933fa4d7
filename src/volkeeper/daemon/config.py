"""The node configuration: one TOML file per node, validated into frozen pydantic models.

How this works: ``load_config`` reads the file, ``parse_config`` runs ``tomllib`` and then
``NodeConfig.model_validate``. Every scalar field has a plain validator of its own that accepts
only the TOML type it expects (no silent coercion) and raises ``ValueError`` with a message that
reads well after the key path; pydantic is left with the structure (tables, arrays, missing and
unknown keys). Cross-field rules (sizes in whole sectors, unique volume names and paths, no peer
named like this node, one address per listener) are validators on the model that owns both
fields. Any failure becomes one ``ConfigError`` with one line per problem::

    alpha.toml: volume[2].sector_size: must be 512 or 4096, got 1000
    alpha.toml: unknown key node.lisen

Array indices in messages are 0-based, as in the key paths pydantic reports. Loading checks
only what must hold before the daemon starts: ``bitmap_dir``, when given, must already exist;
``state_dir`` and volume files are created later by the daemon. The optional ``[tls]`` table's
PEM files must exist and be readable; their contents are checked when the daemon builds its
TLS contexts (io/peer_tls.py).

Jobs (``[[job]]`` with ``[[job.mirror]]`` tables, ``NODE:VOLUME`` on both ends) are checked in
two steps. The structure holds for every job, whichever nodes it involves, so one shared jobs
list can be pasted into every node's file: one source node per job, a target on another node,
no job name twice, a volume the target of one mirror at most and never both a source and a
target. Jobs that involve this node must also fit it: a source here needs its volume in
``[[volume]]`` and its target node in ``[peers]``; a target here needs a writable
``[[volume]]``. A validator that knows which key of a list item is at fault raises
``_KeyedProblems`` with key paths relative to its own, so the message names that key.
"""

from __future__ import annotations

import itertools
import json
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from volkeeper.core.addresses import TcpAddress, UnixAddress, parse_address, parse_tcp_address
from volkeeper.core.bitmap import MAX_REGION_SIZE, MIN_REGION_SIZE
from volkeeper.core.compression_setting import NO_COMPRESSION, parse_compression
from volkeeper.core.units import parse_rate, parse_size
from volkeeper.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
SECTOR_SIZES = (512, 4096)
MIRROR_MODES = ("sync", "async")
DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024  # as daemon/mirror.py, which this module must not import
MIN_QUEUE_LIMIT = 1024 * 1024
MAX_DESCRIPTION = 1024  # characters, as job records keep it

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", re.ASCII)
_NAME_RULE = '1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit'
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_TOML_POSITION_RE = re.compile(r"(.*) \(at (.*)\)", re.DOTALL)
_EXPECTED_TYPES = {
    "model_type": "a table",
    "dict_type": "a table",
    "list_type": "an array of tables",
}
# Reported by pydantic for a default that depends on a field that already failed: noise.
_CONSEQUENTIAL_ERRORS = {"default_factory_not_called"}


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _name(value: object) -> str:
    text = _string(value)
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f"expected {_NAME_RULE}, got {_show(value)}")
    return text


def _volume_ref(value: object) -> str:
    text = _string(value)
    node, colon, volume = text.partition(":")
    expected = f'expected NODE:VOLUME like "alpha:data1", got {_show(value)}'
    if not colon:
        raise ValueError(expected)
    for what, name in (("node", node), ("volume", volume)):
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"{expected}: the {what} name must be {_NAME_RULE}")
    return text


def _absolute_path(value: object) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {_show(value)}")
    return Path(text)


def _existing_directory(value: object) -> Path:
    path = _absolute_path(value)
    if not path.exists():
        raise ValueError(f"directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


def _readable_file(value: object) -> Path:
    path = _absolute_path(value)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def _tcp_address(value: object) -> TcpAddress:
    return parse_tcp_address(_string(value))


def _address(value: object) -> UnixAddress | TcpAddress:
    return parse_address(_string(value))


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'expected a number of bytes or a size like "1GiB", got {_show(value)}')
    size = parse_size(value)
    if size == 0:
        raise ValueError("must be larger than 0 bytes")
    return size


def _queue_limit(value: object) -> int:
    size = _size(value)
    if size < MIN_QUEUE_LIMIT:
        raise ValueError(f"must be at least 1 MiB ({MIN_QUEUE_LIMIT} bytes), got {size}")
    return size


def _region_size(value: object) -> int:
    size = _size(value)
    if not MIN_REGION_SIZE <= size <= MAX_REGION_SIZE or size & (size - 1):
        raise ValueError(f"must be a power of two from 4 KiB to 1 MiB, got {size}")
    return size


def _rate(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'expected bytes per second or a rate like "100MiB/s", got {_show(value)}')
    return parse_rate(value)


def _mode(value: object) -> str:
    mode = _string(value).lower()
    if mode not in MIRROR_MODES:
        raise ValueError(f'must be "sync" or "async", got {_show(value)}')
    return mode


def _description(value: object) -> str:
    text = _string(value)
    if len(text) > MAX_DESCRIPTION:
        raise ValueError(f"must be at most {MAX_DESCRIPTION} characters, got {len(text)}")
    return text


def _compression(value: object) -> str:
    return parse_compression(_string(value))


def _sector_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in SECTOR_SIZES:
        return value
    raise ValueError(f"must be 512 or 4096, got {_show(value)}")


def _log_level(value: object) -> str:
    level = _string(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {_show(value)}")
    return level


Name = Annotated[str, PlainValidator(_name)]
AbsolutePath = Annotated[Path, PlainValidator(_absolute_path)]
ExistingDirectory = Annotated[Path, PlainValidator(_existing_directory)]
ReadableFile = Annotated[Path, PlainValidator(_readable_file)]
PeerAddress = Annotated[TcpAddress, PlainValidator(_tcp_address), PlainSerializer(str)]
ListenAddress = Annotated[UnixAddress | TcpAddress, PlainValidator(_address), PlainSerializer(str)]
Size = Annotated[int, PlainValidator(_size)]
SectorSize = Annotated[int, PlainValidator(_sector_size)]
LogLevel = Annotated[str, PlainValidator(_log_level)]
Description = Annotated[str, PlainValidator(_description)]
VolumeRef = Annotated[str, PlainValidator(_volume_ref)]
MirrorMode = Annotated[str, PlainValidator(_mode)]
QueueLimit = Annotated[int, PlainValidator(_queue_limit)]
RegionSize = Annotated[int, PlainValidator(_region_size)]
Compression = Annotated[str, PlainValidator(_compression)]
Rate = Annotated[int, PlainValidator(_rate)]


class _KeyedProblems(ValueError):
    """Problems of a validated list, each as (key path relative to the list, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


def _default_bitmap_dir(validated: dict[str, Any]) -> Path:
    # state_dir is absent only if it failed validation; that failure is what gets reported.
    return Path(validated.get("state_dir", "/")) / "bitmaps"


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Table):
    """The ``[node]`` table: who this node is and where it listens."""

    name: Name
    state_dir: AbsolutePath
    bitmap_dir: ExistingDirectory = Field(default_factory=_default_bitmap_dir)
    listen: PeerAddress
    control: ListenAddress
    nbd: ListenAddress
    log_level: LogLevel = "info"

    @model_validator(mode="after")
    def _one_address_per_listener(self) -> Self:
        clashes = [
            f'{first} and {second} are both "{getattr(self, first)}"; '
            "each listener needs its own address"
            for first, second in itertools.combinations(("listen", "control", "nbd"), 2)
            if getattr(self, first) == getattr(self, second)
        ]
        if clashes:
            raise ValueError("\n".join(clashes))
        return self


class VolumeConfig(_Table):
    """One ``[[volume]]`` table: a local file or block device, exported over NBD by name."""

    name: Name
    path: AbsolutePath
    sector_size: SectorSize = 512
    size: Size | None = None
    read_only: StrictBool = False

    @field_validator("size")
    @classmethod
    def _whole_sectors(cls, size: int | None, info: ValidationInfo) -> int | None:
        sector_size = info.data.get("sector_size")
        if size is not None and sector_size and size % sector_size:
            raise ValueError(f"{size} bytes is not a multiple of sector_size {sector_size}")
        return size


class TlsSection(_Table):
    """The optional ``[tls]`` table: PEM files for mutual TLS on the replication link.

    Only presence and readability are checked here; io/peer_tls.py parses the contents.
    """

    certificate: ReadableFile
    key: ReadableFile
    ca: ReadableFile


class MirrorConfig(_Table):
    """One ``[[job.mirror]]`` table: a source volume replicated to a volume on another node."""

    source: VolumeRef
    target: VolumeRef
    mode: MirrorMode = "sync"
    queue_limit: QueueLimit = DEFAULT_QUEUE_LIMIT  # async: bytes sent and not yet acknowledged
    region_size: RegionSize = MIN_REGION_SIZE  # intent-log bytes per bit
    compression: Compression = NO_COMPRESSION
    throttle: Rate | None = None  # bytes per second; None: unthrottled

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


class JobConfig(_Table):
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
            raise _KeyedProblems(problems)
        return mirrors

    @property
    def source_node(self) -> str:
        """The node all of this job's mirrors start from."""
        return self.mirrors[0].source_node


class NodeConfig(_Table):
    """A whole node config file."""

    node: NodeSection
    peers: dict[Name, PeerAddress] = Field(default_factory=dict)
    volumes: list[VolumeConfig] = Field(default_factory=list, alias="volume")
    tls: TlsSection | None = None
    jobs: list[JobConfig] = Field(default_factory=list, alias="job")

    @field_validator("peers")
    @classmethod
    def _not_self(cls, peers: dict[str, TcpAddress], info: ValidationInfo) -> dict[str, TcpAddress]:
        node = info.data.get("node")
        if node is not None and node.name in peers:
            raise ValueError(f'"{node.name}" is this node\'s own name; list only the other nodes')
        return peers

    @field_validator("volumes")
    @classmethod
    def _unique_volumes(cls, volumes: list[VolumeConfig]) -> list[VolumeConfig]:
        problems = [
            *_duplicates(
                volumes, "name", 'name "{}" is declared twice (volume[{}] and volume[{}])'
            ),
            *_duplicates(volumes, "path", "path {} is used twice (volume[{}] and volume[{}])"),
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return volumes

    @field_validator("jobs")
    @classmethod
    def _jobs_fit(cls, jobs: list[JobConfig], info: ValidationInfo) -> list[JobConfig]:
        # node, peers and volumes are missing from info.data if they failed: checks that need
        # them are skipped, their own failure is what gets reported.
        index = _JobIndex(jobs)
        node: NodeSection | None = info.data.get("node")
        volumes, peers = info.data.get("volumes"), info.data.get("peers")
        local = _LocalView(node.name, volumes, peers) if node else None
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
            raise _KeyedProblems(problems)
        return jobs


def _duplicates(volumes: list[VolumeConfig], field: str, template: str) -> list[str]:
    first_index: dict[object, int] = {}
    problems = []
    for index, volume in enumerate(volumes):
        value = getattr(volume, field)
        if value in first_index:
            problems.append(template.format(value, first_index[value], index))
        first_index.setdefault(value, index)
    return problems


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
        volumes: list[VolumeConfig] | None,
        peers: dict[str, TcpAddress] | None,
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


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate the node config at ``path``; every failure is a ``ConfigError``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> NodeConfig:
    """Validate TOML ``text``; ``source`` names it in error messages (usually the file path)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_problem(str(exc), source)) from None
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            line
            for detail in exc.errors()
            if detail["type"] not in _CONSEQUENTIAL_ERRORS
            for line in _problem_lines(detail, source)
        ]
        raise ConfigError("\n".join(lines)) from None


def _toml_problem(message: str, source: str) -> str:
    match = _TOML_POSITION_RE.fullmatch(message)
    if match is None:
        return f"{source}: invalid TOML: {message}"
    return f"{source}: {match[2]}: invalid TOML: {match[1]}"


def _problem_lines(detail: ErrorDetails, source: str) -> list[str]:
    key = _key_path(detail["loc"])
    if detail["type"] == "extra_forbidden":
        return [f"{source}: unknown key {key}"]
    if detail["type"] == "missing":
        return [f"{source}: missing required key {key}"]
    error = detail.get("ctx", {}).get("error")
    if detail["type"] == "value_error" and isinstance(error, _KeyedProblems):
        return [f"{source}: {key}{subkey}: {message}" for subkey, message in error.problems]
    prefix = f"{source}: {key}: " if key else f"{source}: "
    return [prefix + line for line in _message(detail).splitlines()]


def _message(detail: ErrorDetails) -> str:
    if detail["type"] == "value_error":
        return str(detail["ctx"]["error"])
    expected = _EXPECTED_TYPES.get(detail["type"])
    if expected:
        return f"expected {expected}, got {_show(detail['input'])}"
    return f"{detail['msg']}, got {_show(detail['input'])}"


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":
            key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            path += f".{key}" if path else key
    return path


def _show(value: object) -> str:
    """Render a TOML value the way it would be written in the file."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)
