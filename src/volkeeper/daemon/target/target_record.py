"""What a target node keeps of each volume it is the target of: one small JSON file each.

How this works: a ``TargetRecord`` names the mirror feeding the volume (job, source node and
volume), what the copy is (data state and generations, as the source last recorded them),
the job's record as the source last sent it, the administrator's pause and unlock, and
the regions a deposed source changed that its successor lacks (``owed``).
``TargetRecords`` keeps one file per volume in ``state_dir/targets``, each replaced
atomically (io/durable_files.py).  The target side's logic is in daemon/target/targets.py and
daemon/target/target_session.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from volkeeper.core.peer import wire as pw
from volkeeper.daemon.jobs.job_record import JobRecord
from volkeeper.io import durable_files


@dataclasses.dataclass
class TargetRecord:
    job: str
    source_node: str
    source_volume: str
    data_state: str = pw.DataState.INCONSISTENT.name
    current_generation: int = 0
    previous_generation: int = 0
    job_document: str = ""  # the job's record as the source last sent it (JSON)
    paused: bool = False  # the source said GOODBYE(PAUSED) and has not come back since
    unlocked: bool = False  # the administrator unlocked the volume (while paused)
    # Regions this copy changed that its source lacks (it was the job's source, deposed):
    # a zlib-compressed bitmap image, base64, of ``owed_region_size`` regions; the source
    # resyncs them too, and they are forgotten once this copy records UpToDate.
    owed: str = ""
    owed_region_size: int = 0

    @property
    def mirror(self) -> str:
        return f"job {self.job!r} from {self.source_node}:{self.source_volume}"

    def shown_data_state(self, target: str) -> str:
        """The copy's data state as users read it (``target``: this copy, NODE:VOLUME): an
        UpToDate copy of an async mirror is Consistent -- write order kept, the last writes
        possibly missing."""
        job = self.job_record()
        mirror = job.mirror(target) if job is not None else None
        asynchronous = mirror is not None and mirror.settings.mode == "async"
        if self.data_state == "UP_TO_DATE" and asynchronous:
            return "Consistent"
        return DATA_STATE_NAMES[self.data_state]

    def job_record(self) -> JobRecord | None:
        try:
            return JobRecord.from_json(self.job_document) if self.job_document else None
        except ValueError:
            return None


DATA_STATE_NAMES = {
    "UP_TO_DATE": "UpToDate",
    "CONSISTENT": "Consistent",
    "INCONSISTENT": "Inconsistent",
    "OUTDATED": "Outdated",
}


class TargetRecords:
    """The durable list of this node's target volumes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load_all(self) -> dict[str, TargetRecord]:
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            records[path.stem] = TargetRecord(**json.loads(path.read_text()))
        return records

    def save(self, volume: str, record: TargetRecord) -> None:
        durable_files.write_json(self.directory / f"{volume}.json", dataclasses.asdict(record))

    def remove(self, volume: str) -> None:
        durable_files.remove(self.directory / f"{volume}.json")
