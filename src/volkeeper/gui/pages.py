"""Rendering: the pages and their live regions, from the fleet's answers and Jinja2 templates.

How this works: a *view* names what a page shows (``overview``, ``job/NAME``, ``node/NAME``);
``regions(view, now)`` renders the view's changing parts, each a template under
``templates/regions/`` with the id it replaces on the page.  A page is its template with the
same regions rendered inside, so the first paint and every live update come from one place.
Filters turn bytes, rates and ages into words (``size``, ``rate``, ``ago``, ``eta``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from volkeeper.core.units import format_size
from volkeeper.gui import board, wizard
from volkeeper.gui.actions import ACTIONS, Action
from volkeeper.gui.chart import Series, line_chart
from volkeeper.gui.fleet import Fleet

CHART_SPAN_S = 120.0


def _size(value: int | float | None) -> str:
    return "?" if value is None else format_size(int(value))


def _rate(value: int | float | None) -> str:
    return "?" if value is None else f"{format_size(int(value))}/s"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _clock(event: dict[str, Any]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(board.event_time(event)))


class Pages:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.env = Environment(
            loader=PackageLoader("volkeeper.gui", "templates"),
            autoescape=select_autoescape(["html"]),
            extensions=["jinja2.ext.do"],
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(size=_size, rate=_rate, ago=_ago, eta=_eta, clock=_clock)
        self.env.globals.update(
            actions=ACTIONS, describe=board.describe, modes=wizard.MODES,
            compressions=wizard.COMPRESSIONS,
        )  # fmt: skip

    def job(self, name: str) -> board.JobRow | None:
        return board.job(self.fleet.links, name, time.time())

    # -- regions -----------------------------------------------------------------------------

    def regions(self, view: str, now: float, csrf: str) -> dict[str, str]:
        """The view's regions (and the header's nodes); ``csrf`` goes into their forms."""
        nodes = [(link.name, link.reachable) for link in self.fleet.links]
        nav = {"nav-nodes": self._render("regions/nav_nodes.html", nodes=nodes)}
        return nav | self._view_regions(view, now, csrf)

    def _view_regions(self, view: str, now: float, csrf: str) -> dict[str, str]:
        kind, _, name = view.partition("/")
        if kind == "job":
            return self._job_regions(name, now, csrf)
        if kind == "node":
            link = self.fleet.link(name)
            row = board.node(link, now) if link else None
            return {"node": self._render("regions/node.html", node=row, name=name)}
        if kind != "overview":
            return {}
        nodes = [board.node(link, now) for link in self.fleet.links]
        jobs = board.jobs(self.fleet.links, now)
        return {"overview": self._render("regions/overview.html", jobs=jobs, nodes=nodes)}

    def _job_regions(self, name: str, now: float, csrf: str) -> dict[str, str]:
        job = board.job(self.fleet.links, name, now)
        events = board.job_events(self.fleet.links, name)
        return {
            "job-state": self._render("regions/job_state.html", job=job, name=name, csrf=csrf),
            "job-chart": self._render("regions/job_chart.html", job=job, **self._charts(job, now)),
            "job-events": self._render("regions/job_events.html", events=events),
        }

    def _charts(self, job: board.JobRow | None, now: float) -> dict[str, str]:
        link = self.fleet.link(job.source_node) if job else None
        if job is None or link is None or job.source_volume is None:
            return {"throughput": "", "ratio": ""}
        rates = link.samples.job_rates(job.name, job.source_volume)
        throughput = line_chart(
            [Series("application writes", [(r.time, r.app_bytes_per_s) for r in rates]),
             Series("sent to targets", [(r.time, r.payload_bytes_per_s) for r in rates]),
             Series("on the wire", [(r.time, r.wire_bytes_per_s) for r in rates])],
            now, _rate, CHART_SPAN_S, floor=1024 * 1024, title="throughput",
        )  # fmt: skip
        ratios = [(r.time, v) for r in rates if (v := r.compression_ratio) is not None]
        ratio = line_chart(
            [Series("compression ratio (sent / wire)", ratios)], now, lambda v: f"{v:.1f}x",
            CHART_SPAN_S, floor=2.0, title="compression ratio",
        )  # fmt: skip
        return {"throughput": throughput, "ratio": ratio}

    # -- pages -------------------------------------------------------------------------------

    def page(
        self, request: Request, template: str, view: str, flash: Any, **context: Any
    ) -> HTMLResponse:
        regions = self.regions(view, time.time(), request.state.csrf)
        context.setdefault("job", self.job(context.get("job_name", "")))
        if context["job"] is not None and context["job"].source_volume:
            context["add_targets"] = self._addable(context["job"])
        return self._page(request, template, view=view, regions=regions, flash=flash, **context)

    def _addable(self, job: board.JobRow) -> list[tuple[str, dict[str, Any]]]:
        source_link = self.fleet.link(job.source_node)
        volumes = (source_link.status or {}).get("volumes", []) if source_link else []
        source = next((v for v in volumes if v["name"] == job.source_volume), None)
        if source is None:
            return []
        return board.usable_targets(self.fleet.links, job.source_node, source)

    def confirm(
        self, request: Request, action: Action, job: board.JobRow, mirror: board.MirrorRow | None
    ) -> HTMLResponse:
        return self._page(request, "confirm.html", action=action, job=job, mirror=mirror,
                          explains=action.explain(job, mirror))  # fmt: skip

    def confirm_target(
        self, request: Request, job: board.JobRow, target: str, settings: dict[str, Any]
    ) -> HTMLResponse:
        return self._page(request, "confirm_target.html", job=job, target=target,
                          settings=settings)  # fmt: skip

    def wizard(
        self,
        request: Request,
        draft: wizard.Draft,
        step: str = "source",
        problem: str = "",
        refusal: Any = None,
    ) -> HTMLResponse:
        links = self.fleet.links
        source = draft.source_volume(links)
        targets = board.usable_targets(links, draft.source_node, source) if source else []
        slots = [*draft.targets, *[wizard.TargetChoice()] * wizard.MAX_TARGETS][
            : wizard.MAX_TARGETS
        ]
        return self._page(
            request, "wizard.html", draft=draft, step=step, steps=wizard.STEPS, problem=problem,
            flash=refusal, sources=board.usable_sources(links), source=source, targets=targets,
            slots=slots, away=[link.name for link in links if not link.reachable],
        )  # fmt: skip

    def login(
        self, request: Request, next_page: str, problem: str, status: int = 200
    ) -> HTMLResponse:
        return self._page(request, "login.html", next_page=next_page, problem=problem,
                          status=status)  # fmt: skip

    def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self._page(request, "error.html", message=message, status=status)

    def _page(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        context.setdefault("view", "")
        context.setdefault("regions", self.regions("", time.time(), request.state.csrf))
        html = self._render(
            template, csrf=request.state.csrf, user=request.state.user, path=request.url.path,
            **context,
        )  # fmt: skip
        return HTMLResponse(html, status_code=status)

    def _render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(now=time.time(), **context)
