"""The node's control API: HTTP+JSON (FastAPI) served by uvicorn inside the daemon's loop.

How this works: ``create_app(node)`` builds the FastAPI application over a ``NodeView`` (the
few read methods the API needs); ``ControlServer`` (daemon/api/control_server.py) serves
it with uvicorn on the node's own event loop, on a unix socket or a TCP port.
The API only reads node state and asks the node to act: if it fails or restarts, the data
path (NBD) is not affected.  Errors are JSON ``{"error": {"code", "message", "hint"}}`` with a
stable ``code``.  The OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from volkeeper import __version__
from volkeeper.core.mirror_settings import NAMES, RATE_SETTINGS, MirrorSettings, parse_fields
from volkeeper.daemon.api.api_models import (
    Deleted,
    ErrorBody,
    ErrorDetail,
    JobView,
    Promoted,
    Resolved,
    Status,
    Switchover,
    VolumeView,
)
from volkeeper.daemon.api.events import EventBus, sse_response
from volkeeper.daemon.api.metrics import render
from volkeeper.daemon.jobs.job_rules import JobRequest, MirrorRequest
from volkeeper.errors import Refusal


class NodeView(Protocol):
    registry: CollectorRegistry
    events: EventBus

    def status(self) -> dict[str, Any]: ...

    def volume_list(self) -> list[dict[str, Any]]: ...

    def job_list(self) -> list[dict[str, Any]]: ...

    def event_snapshot(self) -> list[dict[str, Any]]: ...

    async def create_job(self, request: JobRequest) -> dict[str, Any]: ...

    async def add_target(
        self, job: str, request: MirrorRequest, confirm: bool
    ) -> dict[str, Any]: ...

    async def delete_job(self, name: str) -> list[str]: ...

    async def mirror_command(
        self, job: str, action: str, target: str | None, options: dict[str, bool]
    ) -> dict[str, Any]: ...

    async def mirror_set(
        self, job: str, target: str | None, changes: dict[str, Any]
    ) -> dict[str, Any]: ...

    def lock_volume(self, volume: str, lock: bool) -> dict[str, Any]: ...

    def release_volume(self, volume: str) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def plan(self, volume: str, seconds: float) -> dict[str, Any]: ...

    async def switchover(self, job: str, to: str) -> dict[str, Any]: ...

    async def promote(self, volume: str, force: bool) -> dict[str, Any]: ...

    async def demote(self, job: str) -> dict[str, Any]: ...

    async def activate(self, job: str) -> dict[str, Any]: ...

    async def resolve(self, job: str, keep: str) -> dict[str, Any]: ...


_DEFAULT = MirrorSettings()


class Body(BaseModel):
    """A request body: a field it does not know is refused, not ignored (a misspelt
    setting must not create a mirror without it)."""

    model_config = ConfigDict(extra="forbid")


class SettingsBody(Body):
    """A mirror's settings as the API takes them (core/mirror_settings.py has the rules)."""

    mode: str = Field(_DEFAULT.mode, description="sync or async")
    queue_limit: int | str = Field(
        _DEFAULT.queue_limit, description="async mode: bytes sent and not yet acknowledged"
    )
    region_size: int | str = Field(
        _DEFAULT.region_size, description="intent-log bytes per bit: a power of two, 4KiB-1MiB"
    )
    compression: str = Field(_DEFAULT.compression, description="none, zlib:1..9, zstd:1..19, lz4")
    throttle: int | str | None = Field(None, description="bytes per second; null: unthrottled")
    resync_min: int | str | None = Field(
        None, description="bytes per second a resync gets under load (default: throttle / 10)"
    )
    resync_max: int | str | None = Field(None, description="bytes per second, at most")

    def settings(self) -> MirrorSettings:
        fields = self.model_dump(include=set(NAMES))
        try:
            return MirrorSettings.from_text(**fields)
        except ValueError as exc:
            raise Refusal("bad_request", str(exc)) from None


class MirrorBody(SettingsBody):
    source: str = Field(description="NODE:VOLUME on this node")
    target: str = Field(description="NODE:VOLUME on a peer")


class JobBody(SettingsBody):
    name: str
    description: str = ""
    source: str | None = Field(None, description="NODE:VOLUME on this node")
    target: str | list[str] | None = Field(None, description="NODE:VOLUME on a peer, or several")
    mirrors: list[MirrorBody] = Field(
        default_factory=list, description="instead of source/target: mirrors with own settings"
    )
    confirm: bool = Field(False, description="the full resync overwrites the targets")


class TargetBody(SettingsBody):
    target: str = Field(description="NODE:VOLUME on a peer")
    source: str | None = Field(None, description="NODE:VOLUME; the job's, if it has one")
    confirm: bool = Field(False, description="the full resync overwrites the target")


class SetBody(Body):
    target: str | None = Field(None, description="NODE:VOLUME; left out: every mirror")
    mode: str | None = None
    queue_limit: int | str | None = None
    compression: str | None = None
    throttle: int | str | None = Field(None, description='a rate, or "none" to remove it')
    resync_min: int | str | None = None
    resync_max: int | str | None = None


class MirrorAction(enum.StrEnum):
    pause = "pause"
    continue_ = "continue"
    break_ = "break"
    resync = "resync"
    verify = "verify"


class VolumeAction(enum.StrEnum):
    lock = "lock"
    unlock = "unlock"
    release = "release"


class SwitchoverBody(Body):
    to: str = Field(description="the node whose copy becomes the source")


class PromoteBody(Body):
    force: bool = Field(False, description="promote a copy that is not UpToDate or Consistent")


class ResolveBody(Body):
    keep: str = Field(description="the node whose data stays; the other side's changes go")


class MirrorCommand(Body):
    target: str | None = Field(None, description="NODE:VOLUME; may be left out (one mirror)")
    full: bool = Field(False, description="resync: resend every region, not only marked ones")
    checksum: bool = Field(
        False, description="resync: compare every region's digest, send only what differs"
    )
    mark: bool = Field(False, description="verify: mark differing regions for resync")


def _mirror_request(source: str, target: str, body: SettingsBody) -> MirrorRequest:
    return MirrorRequest(source, target, body.settings())


def _job_request(body: JobBody) -> JobRequest:
    mirrors = [_mirror_request(m.source, m.target, m) for m in body.mirrors]
    if body.source is not None or body.target is not None:
        if mirrors or body.source is None or not body.target:
            raise Refusal("bad_request", "give either source and target, or mirrors")
        targets = [body.target] if isinstance(body.target, str) else body.target
        mirrors = [_mirror_request(body.source, target, body) for target in targets]
    return JobRequest(body.name, tuple(mirrors), body.description, body.confirm)


def _changes(body: SetBody) -> dict[str, Any]:
    given = body.model_fields_set - {"target"}
    if not given:
        raise Refusal(
            "bad_request",
            "nothing to set: give mode, queue_limit, compression, throttle, resync_min or "
            "resync_max",
        )
    fields = {name: getattr(body, name) for name in given}
    fields = {k: v for k, v in fields.items() if v is not None or k in RATE_SETTINGS}
    try:
        return parse_fields(fields)
    except ValueError as exc:
        raise Refusal("bad_request", str(exc)) from None


def error_body(code: str, message: str, hint: str = "") -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(code=code, message=message, hint=hint)).model_dump()


def create_app(node: NodeView) -> FastAPI:
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": "refused: the body says why"}
        for status in (*Refusal.STATUS.values(), 405, 422)
    }
    app = FastAPI(title="volkeeper node control API", version=__version__, responses=errors)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
        hint = "GET /openapi.json lists the API" if exc.status_code in (404, 405) else ""
        return JSONResponse(error_body(code, str(exc.detail), hint), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(error_body("bad_request", message), status_code=422)

    @app.get("/status", response_model=Status, response_model_exclude_unset=True)
    async def status() -> dict[str, Any]:
        """The node, its volumes and its mirrors (the stable `status --json` document)."""
        return node.status()

    @app.get("/volumes", response_model=list[VolumeView], response_model_exclude_unset=True)
    async def volumes() -> list[dict[str, Any]]:
        """The node's volumes with size, sector size, role and I/O counters."""
        return node.volume_list()

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        body = error_body(exc.code, str(exc), exc.hint)
        return JSONResponse(body, status_code=exc.http_status)

    @app.get("/jobs", response_model=list[JobView], response_model_exclude_unset=True)
    async def jobs() -> list[dict[str, Any]]:
        """Jobs this node takes part in (role source or target), each with its mirrors."""
        return node.job_list()

    @app.post("/jobs", status_code=201, response_model=JobView, response_model_exclude_unset=True)
    async def create_job(job: JobBody) -> dict[str, Any]:
        """Create a job: its targets are prepared (checked and locked) first, then every
        mirror starts with a full resync (needs confirm=true).  Answers the job's view."""
        return await node.create_job(_job_request(job))

    @app.post(
        "/jobs/{name}/targets",
        status_code=201,
        response_model=JobView,
        response_model_exclude_unset=True,
    )
    async def add_target(name: str, body: TargetBody) -> dict[str, Any]:
        """Add a mirror to a job (a full resync of the new target; needs confirm=true)."""
        request = _mirror_request(body.source or "", body.target, body)
        return await node.add_target(name, request, body.confirm)

    @app.post(
        "/jobs/{name}/mirror/{action}", response_model=JobView, response_model_exclude_unset=True
    )
    async def mirror_command(
        name: str, action: MirrorAction, command: MirrorCommand | None = None
    ) -> dict[str, Any]:
        """pause (writes are marked, nothing is sent), continue (reconnect and resync what
        was marked), break (stop tracking: only a full resync repairs it), resync (now; with
        full=true every region, with checksum=true every region that differs), verify
        (compare by digests while mirroring; mark=true marks what differs) -- on the
        mirror to ``target``, or on all of the job's.  Answers the job's view."""
        command = command or MirrorCommand(target=None, full=False, checksum=False, mark=False)
        options = command.model_dump(include={"full", "checksum", "mark"})
        return await node.mirror_command(name, action.value, command.target, options)

    @app.patch("/jobs/{name}/mirror", response_model=JobView, response_model_exclude_unset=True)
    async def mirror_set(name: str, body: SetBody) -> dict[str, Any]:
        """Change mode, queue limit, compression or throttle of live mirrors."""
        return await node.mirror_set(name, body.target, _changes(body))

    @app.delete("/jobs/{name}/mirror", response_model=JobView, response_model_exclude_unset=True)
    async def delete_mirror(name: str, target: str | None = None) -> dict[str, Any]:
        """Delete a mirror of the job (``target``; may be left out if it has one): the
        target is unlocked and keeps its data.  The job goes with its last mirror."""
        return await node.mirror_command(name, "delete", target, {})

    @app.delete("/jobs/{name}", response_model=Deleted)
    async def delete_job(name: str) -> dict[str, Any]:
        """Delete a job: its targets are unlocked and keep their data as it is.  Warnings
        name targets that could not be told (they stay locked)."""
        return {"deleted": name, "warnings": await node.delete_job(name)}

    @app.post("/jobs/{name}/switchover", response_model=Switchover)
    async def switchover(name: str, body: SwitchoverBody) -> dict[str, Any]:
        """Planned reversal: writes stop here (clients in flight are answered, then
        disconnected), every mirror drains, and the copy on ``to`` becomes the job's source;
        this node becomes its target.  Refused unless the mirror to ``to`` is Mirroring."""
        return await node.switchover(name, body.to)

    @app.post("/volumes/{name}/promote", response_model=Promoted)
    async def promote(name: str, body: PromoteBody | None = None) -> dict[str, Any]:
        """Failover, on a target node whose source is gone: this node becomes the source of
        the volume's job.  Refused while the source is connected (switch over instead), and,
        without force, unless the copy is UpToDate (or Consistent: async)."""
        return await node.promote(name, body.force if body is not None else False)

    @app.post("/jobs/{name}/demote", response_model=JobView, response_model_exclude_unset=True)
    async def demote(name: str) -> dict[str, Any]:
        """On the source (a cluster manager's demote): writes stop, every mirror drains,
        and the job waits, locked, for another node to take it over (or ``activate``)."""
        return await node.demote(name)

    @app.post("/jobs/{name}/activate", response_model=JobView, response_model_exclude_unset=True)
    async def activate(name: str) -> dict[str, Any]:
        """On a demoted source: take writes again."""
        return await node.activate(name)

    @app.post("/jobs/{name}/resolve", response_model=Resolved)
    async def resolve(name: str, body: ResolveBody) -> dict[str, Any]:
        """Split brain: keep the data of node ``keep``; the other side becomes its target
        and its own changes are overwritten (listed in the answer)."""
        return await node.resolve(name, body.keep)

    @app.get("/volumes/{name}/plan")
    async def plan(name: str, seconds: float = 60.0) -> dict[str, Any]:
        """Measure the volume's write rate for ``seconds`` (average, p95, peak) and the
        bandwidth a mirror of it needs with each compression setting, from its own data.
        The answer comes after ``seconds``."""
        return await node.plan(name, seconds)

    @app.post("/volumes/{name}/{action}")
    async def volume_command(name: str, action: VolumeAction) -> dict[str, Any]:
        """On a target node: unlock (only while the mirror is Paused; writes made here are
        overwritten by the next resync, which is then a full one), lock, or release (forget
        the mirror, when its source is gone for good)."""
        if action is VolumeAction.release:
            return node.release_volume(name)
        return node.lock_volume(name, action is VolumeAction.lock)

    @app.get("/events")
    async def events(initial: bool = True) -> Response:
        """Server-sent events: every change of a mirror, job or volume as it happens
        (with initial=true, first an ``exists`` event per object, then ``exists -``)."""
        return sse_response(node.events, node.event_snapshot if initial else None)

    @app.get("/events/recent")
    async def recent_events(after: int = 0) -> dict[str, Any]:
        """The node's last events (at most 512) numbered after ``after``: ``{"boot", "seq",
        "events"}``; ``boot`` changes when the daemon restarts (numbering starts again)."""
        return node.events.recent(after)

    @app.post("/reload")
    async def reload() -> dict[str, Any]:
        """Re-read the config file and apply it (as SIGHUP does); answers what changed."""
        return await node.reload()

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(render(node.registry), media_type="text/plain; version=0.0.4")

    return app
