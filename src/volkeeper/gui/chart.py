"""A small line chart drawn as inline SVG on the server: the GUI's chart library.

How this works: ``line_chart`` takes series of (time, value) points and draws them over the
last ``span`` seconds, scaled to the largest value (at least ``floor``), with three horizontal
grid lines labelled by ``label`` (a size or rate formatter) and a legend.  The page needs no
script to show it, and a live update is just a new SVG.  Colours come from CSS classes
(``series-0``, ``series-1``...) so the stylesheet decides them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 10, 22


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]


def line_chart(
    series: Sequence[Series],
    now: float,
    label: Callable[[float], str],
    span: float = 120.0,
    floor: float = 1.0,
    title: str = "",
) -> str:
    top = max([floor, *(v for s in series for _, v in s.points)])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + plot_w * (1 - min(span, max(0.0, now - t)) / span)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - max(0.0, v) / top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for fraction in (0.0, 0.5, 1.0):
        gy = y(top * fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" '
                     f'y2="{gy:.1f}"/>')  # fmt: skip
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">'
                     f"{escape(label(top * fraction))}</text>")  # fmt: skip
    parts.append(f'<text class="axis" x="{LEFT}" y="{HEIGHT - 6}">-{span:.0f} s</text>')
    parts.append(f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" '
                 'text-anchor="end">now</text>')  # fmt: skip
    for index, one in enumerate(series):
        shown = [(t, v) for t, v in one.points if now - t <= span]
        if len(shown) >= 2:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in shown)
            parts.append(f'<polyline class="series-{index}" fill="none" points="{path}"/>')
        lx = LEFT + 10 + 170 * index
        parts.append(f'<rect class="series-{index}" x="{lx}" y="{TOP + 2}" width="10" '
                     'height="10"/>')  # fmt: skip
        parts.append(f'<text class="legend" x="{lx + 14}" y="{TOP + 11}">'
                     f"{escape(one.name)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)
