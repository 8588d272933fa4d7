"""The node's control API: HTTP+JSON (FastAPI) served by uvicorn inside the daemon's loop.

How this works: ``create_app(node)`` builds the FastAPI application over a ``NodeView`` (the
few read methods the API needs); ``ControlServer`` runs uvicorn on the node's own event loop,
on a unix socket or a TCP port, without uvicorn's signal handling (the daemon owns signals).
The API only reads node state and asks the node to act: if it fails or restarts, the data
path (NBD) is not affected.  Errors are JSON ``{"error": {"code", "message", "hint"}}`` with a
stable ``code``.  The OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from collections.abc import Generator
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from volkeeper import __version__
from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.core.units import parse_size
from volkeeper.daemon.jobs import JobError, JobRequest
from volkeeper.daemon.metrics import render
from volkeeper.io.listeners import bind_listener, remove_listener


class NodeView(Protocol):
    registry: CollectorRegistry

    def status(self) -> dict[str, Any]: ...

    def volume_list(self) -> list[dict[str, Any]]: ...

    def job_list(self) -> list[dict[str, Any]]: ...

    async def create_job(self, request: JobRequest) -> dict[str, Any]: ...

    async def delete_job(self, name: str) -> None: ...

    async def mirror_command(
        self, job: str, action: str, target: str | None, full: bool
    ) -> dict[str, Any]: ...


class JobBody(BaseModel):
    name: str
    source: str = Field(description="NODE:VOLUME on this node")
    target: str = Field(description="NODE:VOLUME on a peer")
    mode: str = Field("sync", description="sync or async")
    confirm: bool = Field(False, description="the full resync overwrites the target")
    queue_limit: int | str = Field(
        "64MiB", description="async mode: bytes sent and not yet acknowledged, at most"
    )
    region_size: int | str = Field(
        "4KiB", description="intent-log bitmap: bytes per bit, a power of two, 4KiB to 1MiB"
    )


class MirrorAction(enum.StrEnum):
    pause = "pause"
    continue_ = "continue"
    break_ = "break"
    resync = "resync"


class MirrorCommand(BaseModel):
    target: str | None = Field(None, description="NODE:VOLUME; may be left out (one mirror)")
    full: bool = Field(False, description="resync: resend every region, not only marked ones")


_STATUS = {"not_found": 404, "conflict": 409, "confirmation_required": 412, "bad_request": 400}


def _size(field: str, value: int | str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise JobError("bad_request", f"{field}: {exc}") from None


def error_body(code: str, message: str, hint: str = "") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint}}


def create_app(node: NodeView) -> FastAPI:
    app = FastAPI(title="volkeeper node control API", version=__version__)

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

    @app.get("/status")
    async def status() -> dict[str, Any]:
        """The node, its volumes and its mirrors (the stable `status --json` document)."""
        return node.status()

    @app.get("/volumes")
    async def volumes() -> list[dict[str, Any]]:
        """The node's volumes with size, sector size, role and I/O counters."""
        return node.volume_list()

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        status = _STATUS.get(exc.code, 400)
        return JSONResponse(error_body(exc.code, str(exc), exc.hint), status_code=status)

    @app.get("/jobs")
    async def jobs() -> list[dict[str, Any]]:
        """Jobs of this node (as a source) with their mirror's state."""
        return node.job_list()

    @app.post("/jobs", status_code=201)
    async def create_job(job: JobBody) -> dict[str, Any]:
        """Create a job: one mirror, starting with a full resync (needs confirm=true)."""
        request = JobRequest(
            job.name, job.source, job.target, job.mode, job.confirm,
            _size("queue_limit", job.queue_limit), _size("region_size", job.region_size),
        )  # fmt: skip
        return await node.create_job(request)

    @app.post("/jobs/{name}/mirror/{action}")
    async def mirror_command(
        name: str, action: MirrorAction, command: MirrorCommand | None = None
    ) -> dict[str, Any]:
        """pause (writes are marked, nothing is sent), continue (reconnect and resync what
        was marked), break (stop tracking: only a full resync repairs it), resync (now; with
        full=true every region).  Answers the mirror's view after the command."""
        command = command or MirrorCommand(target=None, full=False)
        return await node.mirror_command(name, action.value, command.target, command.full)

    @app.delete("/jobs/{name}/mirror", status_code=204)
    async def delete_mirror(name: str, target: str | None = None) -> None:
        """Delete the job's mirror: the target is unlocked and keeps its data.  A job has one
        mirror, so the job goes with it."""
        await node.mirror_command(name, "delete", target, False)

    @app.delete("/jobs/{name}", status_code=204)
    async def delete_job(name: str) -> None:
        """Delete a job: the target is unlocked and keeps its data as it is."""
        await node.delete_job(name)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(render(node.registry), media_type="text/plain; version=0.0.4")

    return app


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: SIGTERM belongs to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ControlServer:
    """uvicorn on a socket bound up front, so a bad address fails the node's start cleanly."""

    def __init__(self, node: NodeView, address: UnixAddress | TcpAddress) -> None:
        self.address = address
        config = uvicorn.Config(
            create_app(node), log_level="warning", lifespan="off", access_log=False
        )
        self._server = _QuietServer(config)
        self._socket: socket.socket | None = None

    def bind(self) -> None:
        self._socket = bind_listener(self.address, "the control API")

    async def serve(self) -> None:
        assert self._socket is not None, "bind() first"
        await self._server.serve(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True

    def close(self) -> None:
        if self._socket is not None:
            remove_listener(self.address, self._socket)
            self._socket = None
