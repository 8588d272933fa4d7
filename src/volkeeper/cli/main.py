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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from volkeeper.cli.client import CliError, ControlClient, resolve_node
from volkeeper.cli.events import stream_events
from volkeeper.cli.status_view import StatusView, VolumeTable, format_rate, job_table
from volkeeper.core.units import format_size
from volkeeper.errors import VolkeeperError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Userspace block replication.")
volume_app = typer.Typer(no_args_is_help=True, help="Volumes of a node.")
app.add_typer(volume_app, name="volume")
job_app = typer.Typer(no_args_is_help=True, help="Jobs: an application's mirrors.")
app.add_typer(job_app, name="job")
mirror_app = typer.Typer(no_args_is_help=True, help="The mirrors of a job: pause, resync, ...")
app.add_typer(mirror_app, name="mirror")

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
    client = _client(node, config)
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
    answer = _client(node, config).request("POST", "/reload")
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


@volume_app.command("list")
def volume_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the node's volumes."""
    volumes = _client(node, config).get("/volumes")
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    Console().print(VolumeTable(volumes))


def _volume_command(action: str, volume: str, node: str | None, config: str | None) -> None:
    view = _client(node, config).request("POST", f"/volumes/{volume}/{action}")
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


def _settings(**options: str | None) -> dict[str, Any]:
    """The settings options given (the node applies its defaults to the rest)."""
    return {name: value for name, value in options.items() if value is not None}


@job_app.command("create")
def job_create(
    name: str,
    source: Annotated[str, typer.Option("--source", help="NODE:VOLUME on this node")],
    target: Annotated[
        list[str], typer.Option("--target", help="NODE:VOLUME on a peer (give one or two)")
    ],
    description: Annotated[str, typer.Option("--description", help="what the job is for")] = "",
    mode: ModeOption = None,
    queue_limit: QueueLimitOption = None,
    region_size: RegionSizeOption = None,
    compression: CompressionOption = None,
    throttle: ThrottleOption = None,
    resync_min: ResyncMinOption = None,
    resync_max: ResyncMaxOption = None,
    yes: YesOption = False,
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a job mirroring SOURCE to each TARGET (a full resync overwrites them)."""
    settings = _settings(
        mode=mode, queue_limit=queue_limit, region_size=region_size, compression=compression,
        throttle=throttle, resync_min=resync_min, resync_max=resync_max,
    )  # fmt: skip
    body = {"name": name, "description": description, "source": source, "target": target,
            "confirm": yes, **settings}  # fmt: skip
    _print_job(_client(node, config).request("POST", "/jobs", body), as_json)


@job_app.command("add-target")
def job_add_target(
    job: str,
    target: Annotated[str, typer.Option("--target", help="NODE:VOLUME on a peer")],
    source: Annotated[
        str | None, typer.Option("--source", help="NODE:VOLUME (if the job has several)")
    ] = None,
    mode: ModeOption = None,
    queue_limit: QueueLimitOption = None,
    region_size: RegionSizeOption = None,
    compression: CompressionOption = None,
    throttle: ThrottleOption = None,
    resync_min: ResyncMinOption = None,
    resync_max: ResyncMaxOption = None,
    yes: YesOption = False,
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a mirror to TARGET to a job (a full resync overwrites the target)."""
    settings = _settings(
        mode=mode, queue_limit=queue_limit, region_size=region_size, compression=compression,
        throttle=throttle, resync_min=resync_min, resync_max=resync_max,
    )  # fmt: skip
    body = {"target": target, "source": source, "confirm": yes, **settings}
    _print_job(_client(node, config).request("POST", f"/jobs/{job}/targets", body), as_json)


@job_app.command("list")
def job_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the jobs the node takes part in, with the state of their mirrors."""
    jobs = _client(node, config).get("/jobs")
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    Console().print(job_table(jobs))


@job_app.command("delete")
def job_delete(name: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Delete a job: its targets are unlocked and keep their data as it is."""
    answer = _client(node, config).request("DELETE", f"/jobs/{name}")
    print(f"job {name} deleted")
    for warning in answer.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    for mirror in job["mirrors"]:
        print(f"job {job['name']}: {mirror['source']} -> {mirror['target']} {mirror['state']}")
    if not job["mirrors"]:
        print(f"job {job['name']}: no mirrors left, deleted")


def _mirror_command(
    action: str, job: str, target: str | None, node: str | None, config: str | None, **extra: Any
) -> None:
    body = {"target": target, **extra}
    answer = _client(node, config).request("POST", f"/jobs/{job}/mirror/{action}", body)
    _print_job(_only(answer, target), as_json=False)


def _only(job: dict[str, Any], target: str | None) -> dict[str, Any]:
    """The job view, with only the mirror to ``target`` (if given)."""
    mirrors = [m for m in job["mirrors"] if target is None or m["target"] == target]
    return {**job, "mirrors": mirrors}


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
    checksum: Annotated[
        bool, typer.Option("--checksum", help="compare every region, send what differs")
    ] = False,
    node: NodeOption = None,
    config: ConfigOption = None,
) -> None:
    """Resync now: the marked regions; with --full the whole volume; with --checksum every
    region whose digest differs on the target (after a restore, or an untrusted bitmap)."""
    _mirror_command("resync", job, target, node, config, full=full, checksum=checksum)


@mirror_app.command("verify")
def mirror_verify(
    job: str,
    target: TargetOption = None,
    mark: Annotated[bool, typer.Option("--mark", help="mark differing regions for resync")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result")] = False,
    node: NodeOption = None,
    config: ConfigOption = None,
) -> None:
    """Compare source and target region by region while mirroring goes on.  With --wait,
    print the result and exit 1 if regions differ."""
    client = _client(node, config)
    answer = client.request("POST", f"/jobs/{job}/mirror/verify", {"target": target, "mark": mark})
    mirrors = _only(answer, target)["mirrors"]
    while wait and any(m["verify"] and m["verify"]["running"] for m in mirrors):
        time.sleep(0.5)
        mirrors = _only(client.get("/status"), target)["mirrors"]
        mirrors = [m for m in mirrors if m["job"] == job and m["role"] == "source"]
    differing = False
    for mirror in mirrors:
        result = mirror["verify"] or {}
        if not wait:
            print(f"job {job}: {mirror['target']} verify started")
            continue
        differing = differing or bool(result.get("differing_bytes"))
        print(f"job {job}: {mirror['target']} differing {format_size(result['differing_bytes'])}"
              f", unverified {format_size(result['unverified_bytes'])}"
              + (f", error: {result['error']}" if result.get("error") else "")
              + (" (marked for resync)" if result.get("mark") and differing else ""))  # fmt: skip
    if differing:
        raise typer.Exit(1)


@mirror_app.command("delete")
def mirror_delete(
    job: str, target: TargetOption = None, node: NodeOption = None, config: ConfigOption = None
) -> None:
    """Delete a mirror (the job goes with its last one): the target is unlocked and keeps
    its data.  --target is needed when the job has several mirrors."""
    params = f"?target={target}" if target else ""
    answer = _client(node, config).request("DELETE", f"/jobs/{job}/mirror{params}")
    print(f"job {job}: mirror deleted" + ("" if answer["mirrors"] else "; the job is gone"))


@mirror_app.command("set")
def mirror_set(
    job: str,
    target: TargetOption = None,
    mode: Annotated[str | None, typer.Option("--mode", help="sync or async")] = None,
    queue_limit: Annotated[str | None, typer.Option("--queue-limit")] = None,
    compression: Annotated[str | None, typer.Option("--compression")] = None,
    throttle: ThrottleOption = None,
    resync_min: ResyncMinOption = None,
    resync_max: ResyncMaxOption = None,
    node: NodeOption = None,
    config: ConfigOption = None,
) -> None:
    """Change mode, queue limit, compression, throttle or resync rates of live mirrors."""
    given = {"mode": mode, "queue_limit": queue_limit, "compression": compression,
             "throttle": throttle, "resync_min": resync_min, "resync_max": resync_max}  # fmt: skip
    body = {"target": target, **{key: value for key, value in given.items() if value is not None}}
    answer = _client(node, config).request("PATCH", f"/jobs/{job}/mirror", body)
    for mirror in _only(answer, target)["mirrors"]:
        throttle_text = format_size(mirror["throttle"]) + "/s" if mirror["throttle"] else "none"
        print(f"job {job}: {mirror['target']} mode {mirror['mode']}, compression "
              f"{mirror['compression']}, throttle {throttle_text}")  # fmt: skip


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
