"""What a job is: its record, as kept on disk by every node that takes part and sent to targets.

How this works: a ``JobRecord`` names the job, its source node, a description and its
mirrors; a ``MirrorRecord`` is one source volume -> target volume with its own settings
(core/mirror_settings.py), the administrator's last word on it (``admin``: active, paused or
broken), so a restart does not undo a pause, and the id of its intent log
(daemon/source/intent_logs.py).  A job's ``epoch`` counts the moves of its source
(daemon/roles/): of two records of one job, the one with the higher epoch is the newer.
Records are JSON; ``to_json``/``from_json`` go through a pydantic TypeAdapter in strict
mode, so a file or a JOB frame with a wrong type is refused with the field it is about.
Records written before settings were one value (flat ``mode``, ``throttle``... beside
``source_volume``) are read as well.  The source node keeps one
file per job in ``state_dir/jobs`` (``JobRecords``); targets keep the document inside their
target records (daemon/target/target_session.py).
``check_mirror`` holds the rules every new or changed mirror must pass.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import structlog

from volkeeper.core.mirror_settings import NAMES, MirrorSettings
from volkeeper.errors import Refusal
from volkeeper.io import durable_files

log = structlog.get_logger("volkeeper.jobs")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_DESCRIPTION = 1024


@dataclass(frozen=True)
class MirrorRecord:
    source_volume: str
    target_node: str
    target_volume: str
    settings: MirrorSettings = field(default_factory=MirrorSettings)
    admin: str = "active"  # or "paused" / "broken": the administrator's last word
    intent_log: str = ""  # its intent log's id (hex), checked when the log is opened; ""
    # in records older than log ids (the log's own id is adopted)

    @property
    def target(self) -> str:
        return f"{self.target_node}:{self.target_volume}"


@dataclass(frozen=True)
class JobRecord:
    name: str
    source_node: str
    mirrors: tuple[MirrorRecord, ...]
    description: str = ""
    declared: bool = False  # declared in the config file: a reload may change or delete it
    epoch: int = 0  # how many times the job's source moved (switchover, failover)
    demoted: bool = False  # the cluster manager demoted this source: no writes until
    # another node takes the job over, or it is promoted again (daemon/roles/switchover.py)

    def mirror(self, target: str) -> MirrorRecord | None:
        return next((m for m in self.mirrors if m.target == target), None)

    def selected(self, target: str | None) -> tuple[MirrorRecord, ...]:
        """The mirror to ``target``, or every mirror when None; refused if there is none."""
        if target is None:
            return self.mirrors
        mirror = self.mirror(target)
        if mirror is None:
            targets = ", ".join(m.target for m in self.mirrors)
            raise Refusal(
                "not_found", f"job {self.name!r} has no mirror to {target}",
                f"its mirrors go to {targets}",
            )  # fmt: skip
        return (mirror,)

    def with_mirror(self, mirror: MirrorRecord) -> JobRecord:
        """This record with ``mirror`` added, or replacing the one with its target."""
        kept = tuple(m for m in self.mirrors if m.target != mirror.target)
        if len(kept) == len(self.mirrors):
            return dataclasses.replace(self, mirrors=(*self.mirrors, mirror))
        mirrors = tuple(mirror if m.target == mirror.target else m for m in self.mirrors)
        return dataclasses.replace(self, mirrors=mirrors)

    def without_mirror(self, target: str) -> JobRecord:
        return dataclasses.replace(
            self, mirrors=tuple(m for m in self.mirrors if m.target != target)
        )

    def to_json(self) -> str:
        return _ADAPTER.dump_json(self).decode()

    @staticmethod
    def from_json(text: str | bytes) -> JobRecord:
        """Raises ValueError naming the first bad field."""
        try:
            return _ADAPTER.validate_json(_settings_nested(text), strict=True)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            raise ValueError(f"{where}: {first['msg']}") from None


_ADAPTER = pydantic.TypeAdapter(JobRecord)
_FLAT_SETTINGS = set(NAMES)


def _settings_nested(text: str | bytes) -> str | bytes:
    """A record written with flat mirror settings, rewritten with nested ones (a document
    that is not such a record is returned as it is, for the adapter to judge)."""
    try:
        document = json.loads(text)
        mirrors = document["mirrors"]
        flat = [m for m in mirrors if isinstance(m, dict) and _FLAT_SETTINGS & m.keys()]
    except (ValueError, TypeError, KeyError):
        return text
    if not flat:
        return text
    for mirror in flat:
        settings = mirror.setdefault("settings", {})
        for name in _FLAT_SETTINGS & mirror.keys():
            settings[name] = mirror.pop(name)
    return json.dumps(document)


def check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name):
        raise Refusal("bad_request", f"{what} {name!r} must match {NAME.pattern}")


def split_volume(text: str, what: str) -> tuple[str, str]:
    """``NODE:VOLUME`` -> (node, volume), both valid names."""
    node, _, volume = text.partition(":")
    if not NAME.fullmatch(node) or not NAME.fullmatch(volume):
        raise Refusal("bad_request", f"{what} must be NODE:VOLUME, got {text!r}")
    return node, volume


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise Refusal("bad_request", f"description is longer than {MAX_DESCRIPTION} characters")


class JobRecords:
    """``state_dir/jobs/NAME.json``: the jobs this node is the source of."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load_all(self) -> tuple[list[JobRecord], dict[str, str]]:
        """(the records, {job name: why its record cannot be read})."""
        records, unreadable = [], {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(JobRecord.from_json(path.read_bytes()))
            except (OSError, ValueError) as exc:  # one bad file must not stop the node
                log.error("job record unreadable: job not started", path=str(path), error=str(exc))
                unreadable[path.stem] = f"job record {path} unreadable: {exc}"
        return records, unreadable

    def save(self, record: JobRecord) -> None:
        durable_files.write_json(self._path(record.name), _as_document(record))

    def remove(self, name: str) -> None:
        durable_files.remove(self._path(name))

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"


def _as_document(record: JobRecord) -> Any:
    return _ADAPTER.dump_python(record, mode="json")
