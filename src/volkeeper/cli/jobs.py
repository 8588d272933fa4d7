"""``volkeeper job ...`` and ``volkeeper mirror ...``: jobs, and their mirrors' commands.

How this works: each command builds the API request from its options (settings only when
given: the node applies its defaults), sends it to the node's control API and prints the
job's mirrors as a table, or the API's JSON with ``--json``.  ``main.py`` adds these two
command groups to the ``volkeeper`` command.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console

from volkeeper.cli.options import (
    CompressionOption,
    ConfigOption,
    JsonOption,
    ModeOption,
    NodeOption,
    QueueLimitOption,
    RegionSizeOption,
    ResyncMaxOption,
    ResyncMinOption,
    TargetOption,
    ThrottleOption,
    YesOption,
    node_client,
)
from volkeeper.cli.status_view import job_table
from volkeeper.core.units import format_size

job_app = typer.Typer(no_args_is_help=True, help="Jobs: an application's mirrors.")
mirror_app = typer.Typer(no_args_is_help=True, help="The mirrors of a job: pause, resync, ...")


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
    _print_job(node_client(node, config).request("POST", "/jobs", body), as_json)


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
    _print_job(node_client(node, config).request("POST", f"/jobs/{job}/targets", body), as_json)


@job_app.command("switchover")
def job_switchover(
    name: str,
    to: Annotated[str, typer.Option("--to", help="the node whose copy becomes the source")],
    node: NodeOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make the job's copy on NODE its source (run on the source; no resync needed)."""
    answer = node_client(node, config).request("POST", f"/jobs/{name}/switchover", {"to": to})
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    print(
        f"job {name}: {answer['new_source']} is the source now, {answer['old_source']} a "
        f"target ({answer['seconds'] * 1000:.0f} ms); mirrors to {', '.join(answer['mirrors'])}"
    )


@job_app.command("list")
def job_list(
    node: NodeOption = None, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """List the jobs the node takes part in, with the state of their mirrors."""
    jobs = node_client(node, config).get("/jobs")
    if as_json:
        print(json.dumps(jobs, indent=2))
        return
    Console().print(job_table(jobs))


@job_app.command("delete")
def job_delete(name: str, node: NodeOption = None, config: ConfigOption = None) -> None:
    """Delete a job: its targets are unlocked and keep their data as it is."""
    answer = node_client(node, config).request("DELETE", f"/jobs/{name}")
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
    answer = node_client(node, config).request("POST", f"/jobs/{job}/mirror/{action}", body)
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
    client = node_client(node, config)
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
    answer = node_client(node, config).request("DELETE", f"/jobs/{job}/mirror{params}")
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
    answer = node_client(node, config).request("PATCH", f"/jobs/{job}/mirror", body)
    for mirror in _only(answer, target)["mirrors"]:
        throttle_text = format_size(mirror["throttle"]) + "/s" if mirror["throttle"] else "none"
        print(f"job {job}: {mirror['target']} mode {mirror['mode']}, compression "
              f"{mirror['compression']}, throttle {throttle_text}")  # fmt: skip
