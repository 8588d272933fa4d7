"""``status`` drawn at 80 and at 160 columns: readable names, errors in full."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from volkeeper.cli.status_view import StatusView

ERROR = "target beta: data1: no space left on device (resync write at 20971520, 1.0 MiB)"


def document() -> dict[str, Any]:
    volume = {
        "name": "data1", "size": 1 << 30, "sector_size": 512, "role": "source",
        "locked": None, "path": "/srv/volkeeper/a-rather-long-directory-name/data1.img",
        "read_bytes": 0, "written_bytes": 4096, "last_error": None,
    }  # fmt: skip
    mirror = {
        "job": "web", "source": "alpha:data1", "target": "beta:data1", "role": "source",
        "mode": "sync", "state": "Resync pending", "out_of_sync_bytes": 1 << 20,
        "throughput_bytes_per_s": 0, "queue_bytes": 0, "last_error": ERROR,
        "resync": {"done_bytes": 0, "total_bytes": 0, "rate_bytes_per_s": 0, "eta_s": None},
    }  # fmt: skip
    return {"node": "alpha", "volumes": [volume], "mirrors": [mirror]}


def draw(width: int) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(StatusView(document()))
    return console.export_text()


def test_at_80_columns_names_and_states_stay_whole() -> None:
    text = draw(80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    for word in ("alpha:data1", "beta:data1", "Resync pending", "1.0 MiB", "sync"):
        assert word in text, text
    assert ERROR in " ".join(text.split())  # the whole reason, wrapped if need be


def test_a_wide_terminal_gets_every_column() -> None:
    text = draw(160)
    for column in ("throughput", "queue", "sector", "written", "role", "mode"):
        assert column in text, text
    assert "…" not in text
