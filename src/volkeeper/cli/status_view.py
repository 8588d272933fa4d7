"""How ``status``, ``volume list`` and ``job list`` draw a node's answer as tables.

How this works: the tables are built when rich renders them (``__rich_console__``), so they
fit the width they get: on a terminal of 120 columns or more every column is shown; below that
a compact layout keeps what an administrator looks at first (job, source -> target, state and
mode, out of sync, resync progress) and folds long names onto a second line instead of
cutting them to "sour…".  Every last error (a mirror's, or a target volume's whose disk failed
a mirror frame) is listed under the tables in full, whatever the width.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.table import Table
from rich.text import Text

from volkeeper.core.units import format_size

WIDE = 120  # columns from which every column of the tables is shown


class StatusView:
    """``GET /status`` of one node, drawn to fit."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        document, wide = self.document, options.max_width >= WIDE
        yield Text.from_markup(f"[bold]node[/bold] {document['node']}")
        for peer in document.get("peers", []):
            if peer["link"] == "insecure":
                yield Text.from_markup(
                    f"[bold red]INSECURE[/] replication link to {peer['name']}: plain TCP, "
                    "neither authenticated nor encrypted (insecure = true)"
                )
            elif peer["link"] == "unpinned":
                yield Text.from_markup(
                    f"[yellow]peer {peer['name']} is not trusted[/]: its links are refused "
                    f"(volkeeper node trust {peer['name']} FINGERPRINT)"
                )
        yield VolumeTable(document["volumes"], wide)
        mirrors = document["mirrors"]
        yield _mirror_table(mirrors, wide) if mirrors else "no mirrors"
        yield from _errors(document["volumes"], mirrors)


class VolumeTable:
    """The volumes of a node; ``wide`` None: decided by the width rendered into."""

    def __init__(self, volumes: list[dict[str, Any]], wide: bool | None = None) -> None:
        self.volumes, self.wide = volumes, wide

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Table]:
        wide = options.max_width >= WIDE if self.wide is None else self.wide
        table = Table(title="volumes")
        columns = ("volume", "size", *(("sector",) if wide else ()), "role", "data", "path")
        for name in columns:
            table.add_column(name, overflow="fold")
        if wide:
            table.add_column("read", overflow="fold")
            table.add_column("written", overflow="fold")
        for volume in self.volumes:
            role = volume["role"] + (" (locked)" if volume.get("locked") else "")
            cells = [volume["name"], format_size(volume["size"])]
            cells += [str(volume["sector_size"])] if wide else []
            data = volume.get("data_state") or "-"
            if wide and volume.get("generation"):
                data += f" {volume['generation'][:8]}"
            cells += [role, data, str(volume.get("path") or "")]
            if wide:
                cells += [format_size(volume.get("read_bytes", 0))]
                cells += [format_size(volume.get("written_bytes", 0))]
            table.add_row(*cells)
        yield table


def job_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table("job", "role", "description", "mirrors", title="jobs")
    for job in jobs:
        mirrors = ", ".join(f"{m['target']} {m['state']}" for m in job["mirrors"])
        table.add_row(job["name"], job["role"], job["description"], mirrors)
    return table


def _mirror_table(mirrors: list[dict[str, Any]], wide: bool) -> Table:
    if wide:
        names = ["job", "source", "target", "role", "mode", "state", "out of sync",
                 "throughput", "queue", "resync"]  # fmt: skip
    else:
        names = ["job", "source -> target", "state", "out of sync", "resync"]
    table = Table(title="mirrors")
    for name in names:
        table.add_column(name, overflow="fold")
    for mirror in mirrors:
        state, out_of_sync = mirror["state"], _size(mirror["out_of_sync_bytes"])
        progress = _progress(mirror["resync"])
        if wide:
            table.add_row(
                mirror["job"], mirror["source"], mirror["target"], mirror["role"],
                mirror["mode"] or "?", state, out_of_sync,
                format_rate(mirror["throughput_bytes_per_s"]), _size(mirror["queue_bytes"]),
                progress,
            )  # fmt: skip
        else:
            pair = f"{mirror['source']}\n-> {mirror['target']}"
            how = f"{state}\n{mirror['mode'] or '?'}, {mirror['role']}"
            table.add_row(mirror["job"], pair, how, out_of_sync, progress)
    return table


def _errors(volumes: list[dict[str, Any]], mirrors: list[dict[str, Any]]) -> Iterator[Text]:
    lines: list[str] = []
    for mirror in mirrors:
        if mirror.get("last_error"):
            lines.append(f"job {mirror['job']} -> {mirror['target']}: {mirror['last_error']}")
    for volume in volumes:
        if volume.get("last_error"):
            lines.append(f"volume {volume['name']}: {volume['last_error']}")
    if lines:
        yield Text("last errors", style="bold")
        for line in lines:
            yield Text(line, style="yellow")


def _size(value: int | None) -> str:
    return "?" if value is None else format_size(value)


def format_rate(value: int | None) -> str:
    return "?" if value is None else f"{format_size(value)}/s"


def _progress(resync: dict[str, Any]) -> str:
    """``42% 120MiB/s ETA 3s`` while resyncing, else empty."""
    if not resync["total_bytes"]:
        return ""
    text = f"{100 * resync['done_bytes'] // resync['total_bytes']}%"
    if resync["rate_bytes_per_s"]:
        text += f" {format_size(resync['rate_bytes_per_s'])}/s"
    if resync["eta_s"] is not None:
        text += f" ETA {resync['eta_s']:.0f}s"
    return text
