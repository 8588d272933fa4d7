"""The ``volkeeper`` command: the daemon entry point and thin commands over the control API.

How this works: each command resolves the node's control address, asks the API, and renders
the answer as rich tables or, with ``--json``, as the API's own JSON (stable for scripts).
Every failure exits non-zero with one line on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from volkeeper.cli.client import CliError, ControlClient, resolve_node
from volkeeper.core.units import format_size
from volkeeper.errors import VolkeeperError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Userspace block replication.")
volume_app = typer.Typer(no_args_is_help=True, help="Volumes of a node.")
app.add_typer(volume_app, name="volume")
job_app = typer.Typer(no_args_is_help=True, help="Jobs: an application's mirrors.")
app.add_typer(job_app, name="job")
mirror_app = typer.Typer(no_args_is_help=True, help="The mirror of a job: pause, resync, ...")
app.add_typer(mirror_app, name="mirror")

NodeOption = Annotated[
    str | None, typer.Option("--node", help="control address: unix:/path or host:port")
]
ConfigOption = Annotated[str | None, typer.Option("--config", help="read the node address here")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
TargetOption = Annotated[
    str | None, typer.Option("--target", help="NODE:VOLUME of the mirror (if the job has more)")
]


def _client(node: str | None, config: str | None) -> ControlClient:
    return ControlClient(resolve_node(node, config))


@app.command()
def daemon(
    config: Annotated[str, typer.Option("--config", help="node config file (TOML)")],
) -> None:
    """Run a node daemon in the foreground until SIGTERM or SIGINT."""
    from volkeeper.daemon.config import load_config
    from volkeeper.daemon.logging import configure_logging
    from volkeeper.daemon.node import run

    node_config = load_config(config)
    configure_logging(node_config.node.log_level)
    run(node_config)


@app.command()
def status(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """Show the node, its volumes and its mirrors."""
    document = _client(node, config).get("/status")
    if as_json:
        print(json.dumps(document, indent=2))
        return
    console = Console()
    console.print(f"[bold]node[/bold] {document['node']}")
    console.print(_volume_table(document["volumes"]))
    if document["mirrors"]:
        console.print(_mirror_table(document["mirrors"]))
    else:
        console.print("no mirrors")


@volume_app.command("list")
def volume_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the node's volumes."""
    volumes = _client(node, config).get("/volumes")
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    Console().print(_volume_table(volumes))


@job_app.command("create")
def job_create(
    name: str,
    source: Annotated[str, typer.Option("--source", help="NODE:VOLUME on this node")],
    target: Annotated[str, typer.Option("--target", help="NODE:VOLUME on a peer")],
    mode: Annotated[str, typer.Option("--mode", help="sync or async")] = "sync",
    queue_limit: Annotated[
        str, typer.Option("--queue-limit", help="async: unacknowledged bytes before tracking")
    ] = "64MiB",
    region_size: Annotated[
        str, typer.Option("--region-size", help="intent-log bytes per bit (4KiB..1MiB)")
    ] = "4KiB",
    yes: Annotated[bool, typer.Option("--yes", help="confirm: the target is overwritten")] = False,
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a job mirroring SOURCE to TARGET (a full resync overwrites the target)."""
    body = {
        "name": name, "source": source, "target": target, "mode": mode, "confirm": yes,
        "queue_limit": queue_limit, "region_size": region_size,
    }  # fmt: skip
    mirror = _client(node, config).request("POST", "/jobs", body)
    if as_json:
        print(json.dumps(mirror, indent=2))
    else:
        print(f"job {name}: {mirror['source']} -> {mirror['target']} ({mirror['state']})")


@job_app.command("list")
def job_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the jobs of the node and the state of their mirrors."""
    mirrors = _client(node, config).get("/jobs")
    if as_json:
        print(json.dumps(mirrors, indent=2))
        return
    Console().print(_mirror_table(mirrors))


@job_app.command("delete")
def job_delete(name: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Delete a job: its target is unlocked and keeps its data as it is."""
    _client(node, config).request("DELETE", f"/jobs/{name}")
    print(f"job {name} deleted")


def _mirror_command(
    action: str, job: str, target: str | None, node: str | None, config: str | None, **extra: Any
) -> None:
    body = {"target": target, **extra}
    mirror = _client(node, config).request("POST", f"/jobs/{job}/mirror/{action}", body)
    print(f"job {job}: {mirror['source']} -> {mirror['target']} {mirror['state']}")


@mirror_app.command("pause")
def mirror_pause(
    job: str, target: TargetOption = None, node: NodeOption = None, config: ConfigOption = None
) -> None:
    """Stop sending to the target; writes are marked and resynced on continue."""
    _mirror_command("pause", job, target, node, config)


@mirror_app.command("continue")
def mirror_continue(
    job: str, target: TargetOption = None, node: NodeOption = None, config: ConfigOption = None
) -> None:
    """Resume a paused mirror: reconnect and resync what was marked."""
    _mirror_command("continue", job, target, node, config)


@mirror_app.command("break")
def mirror_break(
    job: str, target: TargetOption = None, node: NodeOption = None, config: ConfigOption = None
) -> None:
    """Stop tracking changes (Broken): only `mirror resync --full` repairs the target."""
    _mirror_command("break", job, target, node, config)


@mirror_app.command("resync")
def mirror_resync(
    job: str,
    target: TargetOption = None,
    full: Annotated[bool, typer.Option("--full", help="resend every region")] = False,
    node: NodeOption = None,
    config: ConfigOption = None,
) -> None:
    """Resync now: the marked regions, or with --full the whole volume."""
    _mirror_command("resync", job, target, node, config, full=full)


@mirror_app.command("delete")
def mirror_delete(
    job: str, target: TargetOption = None, node: NodeOption = None, config: ConfigOption = None
) -> None:
    """Delete the mirror (and its job): the target is unlocked and keeps its data."""
    path = f"/jobs/{job}/mirror" + (f"?target={target}" if target else "")
    _client(node, config).request("DELETE", path)
    print(f"job {job}: mirror deleted")


def _mirror_table(mirrors: list[dict[str, Any]]) -> Table:
    table = Table("job", "source", "target", "mode", "state", "out of sync", "sent", "queue",
                  "resync", title="mirrors")  # fmt: skip
    for mirror in mirrors:
        table.add_row(
            mirror["job"], mirror["source"], mirror["target"], mirror["mode"], mirror["state"],
            format_size(mirror["out_of_sync_bytes"]), format_size(mirror["sent_bytes"]),
            format_size(mirror.get("queue_bytes", 0)), _progress(mirror["resync"]),
        )  # fmt: skip
    return table


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


def _volume_table(volumes: list[dict[str, Any]]) -> Table:
    table = Table("volume", "size", "sector", "role", "path", "read", "written", title="volumes")
    for volume in volumes:
        role = volume["role"] + (" (locked)" if volume.get("locked") else "")
        table.add_row(
            volume["name"],
            format_size(volume["size"]),
            str(volume["sector_size"]),
            role,
            str(volume.get("path") or ""),
            format_size(volume.get("read_bytes", 0)),
            format_size(volume.get("written_bytes", 0)),
        )
    return table


def main() -> None:
    try:
        app(standalone_mode=False)
    except VolkeeperError as exc:
        _report(str(exc), 2 if type(exc).__name__ == "ConfigError" else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _report(message: str, code: int) -> None:
    print(f"volkeeper: {message}", file=sys.stderr)
    sys.exit(code)


__all__ = ["CliError", "app", "main"]
