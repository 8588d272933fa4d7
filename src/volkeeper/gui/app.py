"""The GUI's web application: pages, their live regions, actions, the wizard, the login.

How this works: every page is rendered on the server (Jinja2 templates in gui/templates) from
the fleet's last answers (gui/board.py).  Parts of a page that change are *regions*: the
page's ``data-live`` names its view, and gui/static/gui.js opens ``/live?view=...``, a stream
of server-sent events; the server renders the view's regions again whenever a node answers
something new (and each second, so ages count on) and sends those whose HTML changed.  If the
stream breaks (the GUI restarted, the network went), the browser reconnects by itself and the
page says so meanwhile.  Forms work without script: a POST acts, then redirects to the page
with the outcome (a message kept server-side under a random id) -- a success, or the node's
refusal in its own words.  Every POST passes the anti-forgery check (gui/access.py) first.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData

from volkeeper.gui import actions, wizard
from volkeeper.gui.access import CSRF_COOKIE, SESSION_COOKIE, Access
from volkeeper.gui.actions import ACTIONS, outcome
from volkeeper.gui.fleet import Answer, Fleet
from volkeeper.gui.pages import Pages

REFRESH_S = 1.0
KEEPALIVE_S = 15.0
FLASHES_KEPT = 200
OPEN_PATHS = ("/login", "/static/")


class Forged(Exception):
    """A state-changing request failed the anti-forgery check; the message says why."""


@dataclass(frozen=True)
class Flash:
    ok: bool
    message: str
    hint: str = ""


class Flashes:
    """Outcomes waiting to be shown once, by random id (a redirect carries the id)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, Flash] = OrderedDict()

    def put(self, flash: Flash) -> str:
        key = secrets.token_urlsafe(9)
        self._kept[key] = flash
        while len(self._kept) > FLASHES_KEPT:
            self._kept.popitem(last=False)
        return key

    def take(self, key: str | None) -> Flash | None:
        return self._kept.pop(key, None) if key else None


def create_app(fleet: Fleet, access: Access) -> FastAPI:
    app = FastAPI(title="volkeeper GUI", docs_url=None, redoc_url=None, openapi_url=None)
    pages = Pages(fleet)
    flashes = Flashes()
    static = resources.files("volkeeper.gui") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE) or access.new_csrf()
        request.state.csrf = csrf
        request.state.user = access.session_user(request.cookies.get(SESSION_COOKIE))
        path = request.url.path
        if access.login_required and request.state.user is None and not path.startswith(OPEN_PATHS):
            if path == "/live" or request.method != "GET":
                return Response("login required", status_code=401)
            return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        response = await call_next(request)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict",
                                secure=access.https)  # fmt: skip
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; "
                                    "style-src 'self'; img-src 'self' data:")  # fmt: skip
        return response

    async def checked_form(request: Request) -> FormData:
        """The POST's form, once it passed the anti-forgery check."""
        form = await request.form()
        origin = request.headers.get("origin") or request.headers.get("referer")
        field = form.get("csrf")
        why = access.forged(
            request.cookies.get(CSRF_COOKIE), field if isinstance(field, str) else None,
            origin, request.headers.get("host", ""),
        )  # fmt: skip
        if why:
            raise Forged(why)
        return form

    @app.exception_handler(Forged)
    async def forged(request: Request, exc: Forged) -> Response:
        return pages.error(request, 403, f"refused: {exc}")

    Form = Depends(checked_form)

    def back(path: str, flash: Flash) -> RedirectResponse:
        separator = "&" if "?" in path else "?"
        return RedirectResponse(f"{path}{separator}flash={flashes.put(flash)}", status_code=303)

    def shown(request: Request) -> Flash | None:
        return flashes.take(request.query_params.get("flash"))

    # -- pages -------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request) -> Response:
        await fleet.fresh()
        return pages.page(request, "overview.html", "overview", shown(request))

    @app.get("/jobs/{name}", response_class=HTMLResponse)
    async def job_page(request: Request, name: str) -> Response:
        await fleet.fresh()
        return pages.page(request, "job.html", f"job/{name}", shown(request), job_name=name)

    @app.get("/nodes/{name}", response_class=HTMLResponse)
    async def node_page(request: Request, name: str) -> Response:
        await fleet.fresh()
        return pages.page(request, "node.html", f"node/{name}", shown(request), node_name=name)

    @app.get("/live")
    async def live(request: Request, view: str = "overview") -> StreamingResponse:
        return StreamingResponse(
            _live(pages, fleet, view, request.state.csrf), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    # -- actions -----------------------------------------------------------------------------

    @app.post("/act", response_class=HTMLResponse)
    async def act(request: Request, form: FormData = Form) -> Response:
        job_name, target = _text(form, "job"), _text(form, "target")
        here = f"/jobs/{quote(job_name, safe='')}"
        action = ACTIONS.get(_text(form, "action"))
        job = pages.job(job_name)
        if action is None or job is None:
            return back(here, Flash(False, "no such action or job (any more): nothing was done"))
        mirror = next((m for m in job.mirrors if m.target == target), None)
        if action.scope == "mirror" and mirror is None:
            return back(here, Flash(False, f"job {job_name} has no mirror to {target}"))
        force = _text(form, "force") == "yes"
        if action.confirm and _text(form, "confirmed") != "yes":
            return pages.confirm(request, action, job, mirror)
        node, method, path, body = actions.request(action, job, mirror, force)
        answer = await fleet.call(node, method, path, body)
        if not answer.ok:
            return back(here, _refused(node, answer))
        destination = "/" if action.name == "delete_job" else here
        return back(destination, Flash(True, outcome(action, answer.body)))

    @app.post("/jobs/{name}/settings")
    async def settings(name: str, form: FormData = Form) -> Response:
        here = f"/jobs/{quote(name, safe='')}"
        job = pages.job(name)
        if job is None:
            return back(here, Flash(False, f"no node that answers knows job {name}"))
        body = wizard.mirror_body(form, "")
        body["target"] = _text(form, "target") or None
        answer = await fleet.call(job.source_node, "PATCH", f"/jobs/{quote(name)}/mirror", body)
        if not answer.ok:
            return back(here, _refused(job.source_node, answer))
        return back(here, Flash(True, f"settings of {body['target']} changed"))

    @app.post("/jobs/{name}/targets", response_class=HTMLResponse)
    async def add_target(request: Request, name: str, form: FormData = Form) -> Response:
        here = f"/jobs/{quote(name, safe='')}"
        job = pages.job(name)
        if job is None or not job.source_volume:
            return back(here, Flash(False, f"no node that answers knows job {name}"))
        target = _text(form, "target")
        if not target:
            return back(here, Flash(False, "choose the volume to add as a target"))
        settings = wizard.mirror_body(form, "")
        if _text(form, "overwrite") != target:  # first ask, naming what is overwritten
            return pages.confirm_target(request, job, target, settings)
        body = {**settings, "target": target, "confirm": True}
        answer = await fleet.call(job.source_node, "POST", f"/jobs/{quote(name)}/targets", body)
        if not answer.ok:
            return back(here, _refused(job.source_node, answer))
        return back(here, Flash(True, f"{target} added: a full resync overwrites it now"))

    # -- the wizard --------------------------------------------------------------------------

    @app.get("/wizard", response_class=HTMLResponse)
    async def wizard_start(request: Request) -> Response:
        await fleet.fresh()
        return pages.wizard(request, wizard.Draft())

    @app.post("/wizard", response_class=HTMLResponse)
    async def wizard_step(request: Request, form: FormData = Form) -> Response:
        draft = wizard.Draft.from_form(form)
        step, problem = draft.next_step(_text(form, "go"), fleet.links)
        if step != "create":
            return pages.wizard(request, draft, step, problem)
        node, body = draft.job_body()
        answer = await fleet.call(node, "POST", "/jobs", body)
        if not answer.ok:
            return pages.wizard(request, draft, "review", refusal=_refused(node, answer))
        created = Flash(True, f"job {draft.name} created: the full resync has started")
        return back(f"/jobs/{quote(draft.name, safe='')}", created)

    # -- login -------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/") -> Response:
        return pages.login(request, _local(next), "")

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request, form: FormData = Form) -> Response:
        next_page = _local(_text(form, "next"))
        user = access.user_for(_text(form, "token"))
        if user is None:
            await asyncio.sleep(0.5)  # a guesser gets two tries a second, not thousands
            return pages.login(request, next_page, "that token is not accepted", status=401)
        response = RedirectResponse(next_page, status_code=303)
        response.set_cookie(SESSION_COOKIE, access.session_cookie(user), httponly=True,
                            samesite="strict", secure=access.https)  # fmt: skip
        return response

    @app.post("/logout")
    async def logout(form: FormData = Form) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    return app


def _refused(node: str, answer: Answer) -> Flash:
    """A node's refusal, in its own words."""
    return Flash(False, f"{node} refused: {answer.message}", answer.hint)


def _text(form: FormData, key: str) -> str:
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


def _local(path: str) -> str:
    """A redirect target on this site only (no ``//evil.example``)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


async def _live(pages: Pages, fleet: Fleet, view: str, csrf: str) -> AsyncIterator[bytes]:
    sent: dict[str, str] = {}
    version, quiet_since = -1, time.monotonic()
    yield b"retry: 1000\n\n"
    while not fleet.closing:
        for region, html in pages.regions(view, time.time(), csrf).items():
            if sent.get(region) != html:
                sent[region], quiet_since = html, time.monotonic()
                data = json.dumps({"id": region, "html": html})
                yield f"event: region\ndata: {data}\n\n".encode()
        if time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield b": keepalive\n\n"  # proxies and the browser see the stream is alive
        version = await fleet.wait_change(version, REFRESH_S)
