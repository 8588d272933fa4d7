"""The node configuration: one TOML file per node, validated into frozen pydantic models.

How this works: ``load_config`` reads the file, ``parse_config`` runs ``tomllib`` and then
``NodeConfig.model_validate``. Every scalar field has a plain validator of its own that accepts
only the TOML type it expects (no silent coercion) and raises ``ValueError`` with a message that
reads well after the key path (those shared with the jobs are in config_types.py); pydantic is
left with the structure (tables, arrays, missing and unknown keys). Cross-field rules (sizes in
whole sectors, unique volume names and paths, no peer named like this node, one address per
listener) are validators on the model that owns both fields. Any failure becomes one
``ConfigError`` with one line per problem::

    alpha.toml: volume[2].sector_size: must be 512 or 4096, got 1000
    alpha.toml: unknown key node.lisen

Array indices in messages are 0-based, as in the key paths pydantic reports. Loading checks
only what must hold before the daemon starts: ``bitmap_dir``, when given, must already exist;
``state_dir`` and volume files are created later by the daemon. The optional ``[tls]`` table's
PEM files must exist and be readable; their contents are checked when the daemon builds its
TLS contexts (io/peer_tls.py).

Jobs (``[[job]]`` with ``[[job.mirror]]`` tables) are modelled and checked in config_jobs.py;
``NodeConfig`` hands ``check_jobs`` this node's name, volumes and peers. A validator that knows
which key of a list item is at fault raises ``KeyedProblems`` (config_types.py) with key paths
relative to its own; ``_problem_lines`` makes each one line that names that key.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
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

from volkeeper.core import fingerprints
from volkeeper.core.addresses import TcpAddress, UnixAddress, parse_address, parse_tcp_address
from volkeeper.core.mirror_engine import DEFAULT_PEER_TIMEOUT
from volkeeper.daemon.config.jobs import JobConfig as JobConfig  # re-exported, as is:
from volkeeper.daemon.config.jobs import MirrorConfig as MirrorConfig
from volkeeper.daemon.config.jobs import check_jobs
from volkeeper.daemon.config.limits import LimitsSection
from volkeeper.daemon.config.types import (
    KeyedProblems,
    Name,
    Size,
    Table,
    as_string,
    ranged,
    show,
)
from volkeeper.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
NBD_TLS_MODES = ("off", "offer", "require")
SECTOR_SIZES = (512, 4096)
PEER_TIMEOUT_RANGE = (1, 600)  # seconds

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_TOML_POSITION_RE = re.compile(r"(.*) \(at (.*)\)", re.DOTALL)
_EXPECTED_TYPES = {
    "model_type": "a table",
    "dict_type": "a table",
    "list_type": "an array of tables",
    "bool_type": "true or false",
}
# Reported by pydantic for a default that depends on a field that already failed: noise.
_CONSEQUENTIAL_ERRORS = {"default_factory_not_called"}


def _absolute_path(value: object) -> Path:
    text = as_string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {show(value)}")
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
    return parse_tcp_address(as_string(value))


def _address(value: object) -> UnixAddress | TcpAddress:
    return parse_address(as_string(value))


def _sector_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in SECTOR_SIZES:
        return value
    raise ValueError(f"must be 512 or 4096, got {show(value)}")


def _log_level(value: object) -> str:
    level = as_string(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {show(value)}")
    return level


def _nbd_tls(value: object) -> str:
    mode = as_string(value)
    if mode not in NBD_TLS_MODES:
        raise ValueError(f"must be one of {', '.join(NBD_TLS_MODES)}, got {show(value)}")
    return mode


def _network(value: object) -> str:
    text = as_string(value)
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"expected an IP address or network (10.0.0.0/24), got {show(value)}"
        ) from None
    return text


AbsolutePath = Annotated[Path, PlainValidator(_absolute_path)]
NbdTls = Annotated[str, PlainValidator(_nbd_tls)]
Network = Annotated[str, PlainValidator(_network)]
ExistingDirectory = Annotated[Path, PlainValidator(_existing_directory)]
ReadableFile = Annotated[Path, PlainValidator(_readable_file)]
PeerAddress = Annotated[TcpAddress, PlainValidator(_tcp_address), PlainSerializer(str)]
ListenAddress = Annotated[UnixAddress | TcpAddress, PlainValidator(_address), PlainSerializer(str)]
SectorSize = Annotated[int, PlainValidator(_sector_size)]
PeerTimeout = Annotated[float, ranged(*PEER_TIMEOUT_RANGE, unit=" seconds")]
LogLevel = Annotated[str, PlainValidator(_log_level)]


def _default_bitmap_dir(validated: dict[str, Any]) -> Path:
    # state_dir is absent only if it failed validation; that failure is what gets reported.
    return Path(validated.get("state_dir", "/")) / "bitmaps"


class NodeSection(Table):
    """The ``[node]`` table: who this node is and where it listens."""

    name: Name
    state_dir: AbsolutePath
    bitmap_dir: ExistingDirectory = Field(default_factory=_default_bitmap_dir)
    listen: PeerAddress
    control: ListenAddress
    nbd: ListenAddress
    log_level: LogLevel = "info"
    # Seconds a peer may say nothing before its link is dropped (see docs/mirroring.md).
    peer_timeout: PeerTimeout = DEFAULT_PEER_TIMEOUT
    # Reads that miss the page cache go through io_uring where the kernel allows it (false:
    # worker threads, as where it does not).
    io_uring: StrictBool = True
    # A unix control socket is 0600 (this daemon's user only); with a group, 0660 and that
    # group's: its members may use the whole API.  On TCP: TLS and tokens instead.
    control_group: Name | None = None
    # NBD over TLS (docs/security.md): off, offer (STARTTLS welcome) or require (refused
    # without); served with nbd_tls_certificate/key, else the node's own certificate; with
    # nbd_tls_ca a client must present a certificate that CA signed.
    nbd_tls: NbdTls = "off"
    nbd_tls_certificate: ReadableFile | None = None
    nbd_tls_key: ReadableFile | None = None
    nbd_tls_ca: ReadableFile | None = None
    # A TCP NBD listener admits only these client addresses or networks (empty: everyone).
    nbd_allow: list[Network] = Field(default_factory=list)

    @model_validator(mode="after")
    def _nbd_tls_files_together(self) -> Self:
        if (self.nbd_tls_certificate is None) != (self.nbd_tls_key is None):
            raise ValueError("nbd_tls_certificate and nbd_tls_key go together")
        return self

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


class VolumeConfig(Table):
    """One ``[[volume]]`` table: a local file or block device, exported over NBD by name."""

    name: Name
    path: AbsolutePath
    sector_size: SectorSize = 512
    size: Size | None = None
    read_only: StrictBool = False
    # NBD clients (addresses or networks) that may only read this volume.
    read_only_clients: list[Network] = Field(default_factory=list)

    @field_validator("size")
    @classmethod
    def _whole_sectors(cls, size: int | None, info: ValidationInfo) -> int | None:
        sector_size = info.data.get("sector_size")
        if size is not None and sector_size and size % sector_size:
            raise ValueError(f"{size} bytes is not a multiple of sector_size {sector_size}")
        return size


class TlsSection(Table):
    """The optional ``[tls]`` table: PEM files for mutual TLS on the replication link.

    Only presence and readability are checked here; io/peer_tls.py parses the contents.
    """

    certificate: ReadableFile
    key: ReadableFile
    ca: ReadableFile


def _fingerprint(value: object) -> str:
    return fingerprints.parse(as_string(value))


Fingerprint = Annotated[str, PlainValidator(_fingerprint)]


class PeerConfig(Table):
    """A ``[peers]`` entry: ``beta = "host:port"``, or a table with the address, the pinned
    fingerprint of beta's identity, and ``insecure = true`` for a plain TCP link."""

    address: PeerAddress
    fingerprint: Fingerprint | None = None
    insecure: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _address_alone(cls, value: object) -> object:
        if isinstance(value, str):
            return {"address": value}
        if not isinstance(value, dict):
            raise ValueError(
                f'expected "host:port" or a table {{ address = "host:port", fingerprint = '
                f'"sha256:..." }}, got {show(value)}'
            )
        return value

    @model_validator(mode="after")
    def _pin_or_insecure(self) -> Self:
        if self.insecure and self.fingerprint is not None:
            raise ValueError(
                "insecure = true turns authentication off: drop it, or drop the fingerprint"
            )
        return self


class NodeConfig(Table):
    """A whole node config file."""

    node: NodeSection
    peers: dict[Name, PeerConfig] = Field(default_factory=dict)
    volumes: list[VolumeConfig] = Field(default_factory=list, alias="volume")
    tls: TlsSection | None = None
    limits: LimitsSection = Field(default_factory=LimitsSection)
    jobs: list[JobConfig] = Field(default_factory=list, alias="job")

    @property
    def peer_addresses(self) -> dict[str, TcpAddress]:
        return {name: peer.address for name, peer in self.peers.items()}

    @field_validator("peers")
    @classmethod
    def _not_self(cls, peers: dict[str, PeerConfig], info: ValidationInfo) -> dict[str, PeerConfig]:
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
        node: NodeSection | None = info.data.get("node")
        volumes, peers = info.data.get("volumes"), info.data.get("peers")
        check_jobs(jobs, node.name if node else None, volumes, peers)
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
    if detail["type"] == "value_error" and isinstance(error, KeyedProblems):
        return [f"{source}: {key}{subkey}: {message}" for subkey, message in error.problems]
    prefix = f"{source}: {key}: " if key else f"{source}: "
    return [prefix + line for line in _message(detail).splitlines()]


def _message(detail: ErrorDetails) -> str:
    if detail["type"] == "value_error":
        return str(detail["ctx"]["error"])
    expected = _EXPECTED_TYPES.get(detail["type"])
    if expected:
        return f"expected {expected}, got {show(detail['input'])}"
    return f"{detail['msg']}, got {show(detail['input'])}"


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":
            key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            path += f".{key}" if path else key
    return path
