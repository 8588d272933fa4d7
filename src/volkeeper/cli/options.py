"""The options every ``volkeeper`` command shares, and the client they lead to.

How this works: typer reads these ``Annotated`` types as the commands' options; ``node_client``
turns ``--node`` / ``--config`` (or VOLKEEPER_NODE) into a client of that node's control API.
"""

from __future__ import annotations

from typing import Annotated

import typer

from volkeeper.cli.client import ControlClient, resolve_node

NodeOption = Annotated[
    str | None, typer.Option("--node", help="control address: unix:/path or host:port")
]
ConfigOption = Annotated[str | None, typer.Option("--config", help="read the node address here")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
TargetOption = Annotated[
    str | None, typer.Option("--target", help="NODE:VOLUME of one mirror (default: all)")
]
ModeOption = Annotated[str | None, typer.Option("--mode", help="sync (default) or async")]
QueueLimitOption = Annotated[
    str | None,
    typer.Option("--queue-limit", help="async: unacknowledged bytes before tracking (64MiB)"),
]
RegionSizeOption = Annotated[
    str | None, typer.Option("--region-size", help="intent-log bytes per bit, 4KiB (default)..1MiB")
]
CompressionOption = Annotated[
    str | None, typer.Option("--compression", help="none (default), zlib:1..9, zstd:1..19, lz4")
]
ThrottleOption = Annotated[
    str | None, typer.Option("--throttle", help="bytes per second, e.g. 50MiB (none: off)")
]
ResyncMinOption = Annotated[
    str | None, typer.Option("--resync-min", help="a resync's rate under load (throttle / 10)")
]
ResyncMaxOption = Annotated[
    str | None, typer.Option("--resync-max", help="a resync's rate, at most (none: no limit)")
]
YesOption = Annotated[bool, typer.Option("--yes", help="confirm: the target is overwritten")]


def node_client(node: str | None, config: str | None) -> ControlClient:
    return ControlClient(resolve_node(node, config))
