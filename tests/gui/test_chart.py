"""The inline SVG chart: scaled to its data, recent points only, labels escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from volkeeper.gui.chart import HEIGHT, LEFT, TOP, WIDTH, Series, line_chart

SVG = "{http://www.w3.org/2000/svg}"


def test_series_are_drawn_over_the_last_span_scaled_to_the_largest_value() -> None:
    points = [(70.0, 0.0), (100.0, 50.0), (130.0, 100.0)]
    svg = line_chart([Series("a <b>", points), Series("empty", [])], now=130.0,
                     label=lambda v: f"{v:.0f}", span=60.0, title="t")  # fmt: skip
    root = ET.fromstring(svg)
    (line,) = root.iter(f"{SVG}polyline")  # a series with fewer than two points has no line
    xy = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
    assert xy[0] == (LEFT, HEIGHT - 22) and xy[-1] == (WIDTH - 10, TOP)
    assert xy[1][0] == (LEFT + WIDTH - 10) / 2
    assert [t.text for t in root.iter(f"{SVG}text")][:3] == ["0", "50", "100"]
    assert "a <b>" in [t.text for t in root.iter(f"{SVG}text")]  # escaped, then parsed back


def test_old_points_are_left_out_and_the_floor_keeps_a_flat_line_flat() -> None:
    svg = line_chart([Series("s", [(0.0, 5.0), (200.0, 0.0), (210.0, 0.0)])], now=210.0,
                     label=str, span=30.0, floor=8.0)  # fmt: skip
    (line,) = ET.fromstring(svg).iter(f"{SVG}polyline")
    assert len(line.attrib["points"].split()) == 2
    assert {p.split(",")[1] for p in line.attrib["points"].split()} == {f"{HEIGHT - 22:.1f}"}
