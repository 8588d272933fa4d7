"""``volkeeper volume promote`` and ``volkeeper mirror resolve``: failover and split brain.

How this works: each command sends its request to the node's control API and prints the
outcome in a sentence or two -- what the promoted copy may lack, which byte ranges a
resolution overwrote -- or the API's JSON with ``--json``.  ``main.py`` adds them to the
``volume`` and ``mirror`` command groups (``job switchover`` is in cli/jobs.py).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from volkeeper.cli.options import ConfigOption, JsonOption, NodeOption, node_client
from volkeeper.core.units import format_size


def volume_promote(
    volume: str,
    force: Annotated[
        bool, typer.Option("--force", help="promote a copy that is not UpToDate/Consistent")
    ] = False,
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Failover: make this target node the source of VOLUME's job (its source is gone)."""
    body = {"force": force}
    answer = node_client(node, config).request("POST", f"/volumes/{volume}/promote", body)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    forced = ", forced" if answer["forced"] else ""
    print(
        f"volume {volume}: source of job {answer['job']} now ({answer['data_state']}{forced}, "
        f"generation {answer['generation']}); mirrors to {', '.join(answer['mirrors'])}"
    )
    print(_may_lack(answer["may_lack"]))


def _may_lack(may_lack: dict[str, Any] | None) -> str:
    if may_lack is None:
        return "it holds every write its source acknowledged"
    when = may_lack["seconds_before"]
    since = f" before {time.strftime('%H:%M:%S', time.localtime(when))}" if when else ""
    return (
        f"async copy: it may lack up to {format_size(may_lack['bytes'])} of writes the source "
        f"acknowledged{since}"
    )


def mirror_resolve(
    job: str,
    keep: Annotated[str, typer.Option("--keep", help="the node whose data stays")],
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Split brain: keep NODE's data; the other side becomes its target (its changes go)."""
    answer = node_client(node, config).request("POST", f"/jobs/{job}/resolve", {"keep": keep})
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    ranges = ", ".join(f"{offset}+{length}" for offset, length in answer["discarded"][:16])
    more = " ..." if len(answer["discarded"]) > 16 else ""
    print(
        f"job {job}: {answer['kept']} kept; {format_size(answer['discarded_bytes'])} of the "
        f"other side's changes overwritten{': ' + ranges + more if ranges else ''}"
    )
