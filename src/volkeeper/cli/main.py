"""The ``volkeeper`` command: the daemon entry point and thin commands over the control API.

How this works: each command resolves the node's control address, asks the API, and renders
the answer as rich tables or, with ``--json``, as the API's own JSON (stable for scripts).
Every failure exits non-zero with one line on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from volkeeper.cli import jobs, roles
from volkeeper.cli.client import CliError, ControlClient, resolve_node
from volkeeper.cli.events import stream_events
from volkeeper.cli.node import node_app, token_app
from volkeeper.cli.options import ConfigOption, JsonOption, NodeOption, node_client
from volkeeper.cli.status_view import StatusView, VolumeTable, format_rate
from volkeeper.core.units import format_size
from volkeeper.errors import VolkeeperError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Userspace block replication.")
volume_app = typer.Typer(no_args_is_help=True, help="Volumes of a node.")
app.add_typer(volume_app, name="volume")
app.add_typer(jobs.job_app, name="job")
app.add_typer(jobs.mirror_app, name="mirror")
app.add_typer(node_app, name="node")
app.add_typer(token_app, name="token")
jobs.mirror_app.command("resolve")(roles.mirror_resolve)


@app.command()
def daemon(
    config: Annotated[str, typer.Option("--config", help="node config file (TOML)")],
) -> None:
    """Run a node daemon in the foreground until SIGTERM or SIGINT."""
    from volkeeper.daemon.config.node import load_config
    from volkeeper.daemon.logging import configure_logging
    from volkeeper.daemon.node import run

    node_config = load_config(config)
    configure_logging(node_config.node.log_level)
    run(node_config, Path(config))


@app.command()
def status(
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option("--interval", help="--watch: seconds")] = 2.0,
) -> None:
    """Show the node, its volumes, its jobs and their mirrors."""
    client = node_client(node, config)
    if not watch:
        document = client.get("/status")
        if as_json:
            print(json.dumps(document, indent=2))
        else:
            Console().print(StatusView(document))
        return
    console = Console()
    if not console.is_terminal:  # a pipe or a file: one status after the other, like a log
        while True:
            console.print(Text(time.strftime("%Y-%m-%d %H:%M:%S"), style="bold"))
            console.print(_watched(client))
            sys.stdout.flush()
            time.sleep(max(0.1, interval))
    with Live(_watched(client), console=console, auto_refresh=False) as live:
        while True:  # until Ctrl-C; a node that stops answering is shown, not fatal
            time.sleep(max(0.1, interval))
            live.update(_watched(client), refresh=True)


def _watched(client: ControlClient) -> StatusView | Text:
    try:
        return StatusView(client.get("/status"))
    except CliError as exc:
        return Text(f"{time.strftime('%H:%M:%S')} {exc}", style="red")


@app.command()
def events(
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    initial: Annotated[
        bool, typer.Option("--initial/--no-initial", help="first the current state")
    ] = True,
) -> None:
    """Stream every change of mirrors, jobs and volumes as it happens (until Ctrl-C)."""
    stream_events(resolve_node(node, config), as_json, initial, sys.stdout)


@app.command("plan")
def plan_command(
    volume: str,
    seconds: Annotated[float, typer.Option("--seconds", help="how long to measure")] = 60.0,
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure VOLUME's write rate through this node and print the bandwidth a mirror of it
    needs with each compression setting (measured on the volume's own data)."""
    client = ControlClient(resolve_node(node, config), timeout=seconds + 120)
    answer = client.get(f"/volumes/{volume}/plan?seconds={seconds}")
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    write = answer["write"]
    console = Console()
    console.print(
        f"[bold]{volume}[/bold] over {answer['seconds']:g} s: writes average "
        f"{format_rate(write['average_bytes_per_s'])}, "
        f"p95 {format_rate(write['p95_bytes_per_s'])}, "
        f"peak {format_rate(write['peak_bytes_per_s'])} (compression measured on "
        f"{format_size(answer['sample_bytes'])} of its data)"
    )
    columns = ("compression", "ratio", "needs (average)", "needs (p95)", "needs (peak)",
               "codec speed / core", "cores at peak")  # fmt: skip
    table = Table(*columns, title="bandwidth a mirror needs")
    for row in answer["settings"]:
        speed = row["compress_bytes_per_s_per_core"]
        table.add_row(
            row["compression"], f"{row['ratio']:.2f}", format_rate(row["average_bytes_per_s"]),
            format_rate(row["p95_bytes_per_s"]), format_rate(row["peak_bytes_per_s"]),
            format_rate(speed) if speed else "-", f"{row['cores_at_peak']:.2f}",
        )  # fmt: skip
    console.print(table)


@app.command()
def reload(node: NodeOption = None, config: ConfigOption = None) -> None:
    """Make the node re-read its config file (as SIGHUP does) and say what changed."""
    answer = node_client(node, config).request("POST", "/reload")
    for key in ("created", "changed", "deleted", "unchanged", "peers_changed"):
        if answer.get(key):
            print(f"{key.replace('_', ' ')}: {', '.join(answer[key])}")
    for error in answer.get("errors", []):
        print(f"not applied: {error}", file=sys.stderr)
    if answer.get("needs_restart"):
        sections = ", ".join(answer["needs_restart"])
        print(f"changed but applied only by a restart: {sections}", file=sys.stderr)
    if answer.get("errors"):
        raise typer.Exit(1)


@app.command()
def gui(
    node: Annotated[
        list[str] | None,
        typer.Option("--node", help="a node's control address (unix:/path or host:port); repeat"),
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option("--config", help="read a node's address here; repeat")
    ] = None,
    listen: Annotated[
        str, typer.Option("--listen", help="host:port; beyond localhost a login is required")
    ] = "127.0.0.1:8470",
    tokens: Annotated[
        Path | None, typer.Option("--tokens", help="login tokens, one per line (NAME TOKEN)")
    ] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="serve HTTPS: certificate")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="serve HTTPS: private key")] = None,
) -> None:
    """Serve the web GUI over the control APIs of the given nodes until Ctrl-C."""
    from volkeeper.core.addresses import parse_tcp_address
    from volkeeper.gui.server import serve

    addresses = [resolve_node(text, None) for text in node or []]
    addresses += [resolve_node(None, path) for path in config or []]
    if not addresses:
        addresses = [resolve_node(None, None)]  # VOLKEEPER_NODE, or the error that asks
    try:
        where = parse_tcp_address(listen)
    except ValueError as exc:
        raise CliError(f"bad --listen address {listen!r}: {exc}") from None
    serve(addresses, where, tokens, cert, key)


@volume_app.command("list")
def volume_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the node's volumes."""
    volumes = node_client(node, config).get("/volumes")
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    Console().print(VolumeTable(volumes))


def _volume_command(action: str, volume: str, node: str | None, config: str | None) -> None:
    view = node_client(node, config).request("POST", f"/volumes/{volume}/{action}")
    locked = f"locked ({view['locked']})" if view.get("locked") else "unlocked"
    print(f"volume {volume}: {view['role']}, {locked}")


@volume_app.command("unlock")
def volume_unlock(volume: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Let a target volume be written here while its mirror is Paused.  Writes made here are
    overwritten when the mirror continues (its resync is then a full one)."""
    _volume_command("unlock", volume, node, config)


@volume_app.command("lock")
def volume_lock(volume: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Lock an unlocked target volume again (the mirror's next connection does it too)."""
    _volume_command("lock", volume, node, config)


@volume_app.command("release")
def volume_release(volume: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Forget the mirror a target volume serves, when its source is gone for good (the
    source's `mirror delete` normally does this).  The data stays as it is."""
    _volume_command("release", volume, node, config)


volume_app.command("promote")(roles.volume_promote)
ocf_app = typer.Typer(no_args_is_help=True, help="Pacemaker: the ocf:volkeeper:job agent.")
app.add_typer(ocf_app, name="ocf")


@ocf_app.command("install")
def ocf_install(
    ocf_root: Annotated[str, typer.Option("--ocf-root", help="OCF_ROOT")] = "/usr/lib/ocf",
) -> None:
    """Install the resource agent where Pacemaker looks for it (run on every node)."""
    from volkeeper.ocf.install import install

    print(f"installed {install(Path(ocf_root))} (ocf:volkeeper:job)")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a typer.Exit(n) comes back as n here
    except VolkeeperError as exc:
        _report(str(exc), 2 if type(exc).__name__ == "ConfigError" else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # usage errors arrive here in non-standalone mode
        import click

        # typer raises its own copy of click's exceptions (typer._click), not click's
        if isinstance(exc, click.ClickException | typer.TyperException):
            show, code = getattr(exc, "show", None), getattr(exc, "exit_code", 2)
            if callable(show):
                show()
            sys.exit(code if isinstance(code, int) else 2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _report(message: str, code: int) -> None:
    print(f"volkeeper: {message}", file=sys.stderr)
    sys.exit(code)


__all__ = ["CliError", "app", "main"]
