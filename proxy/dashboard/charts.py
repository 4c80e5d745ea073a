"""Charts as SVG written on the server: a time series (one or more lines over time, readable axes, a unit, a
tooltip on every point) and horizontal bars. No script draws them and no style attribute is used, so the
dashboard's Content-Security-Policy stays strict; colours come from the stylesheet's classes (light and dark)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

from markupsafe import Markup

WIDTH: Final = 640
HEIGHT: Final = 200
_RIGHT, _TOP, _BOTTOM = 12, 12, 28  # the plot area's margins (the left one fits the y axis' labels)
_CHAR = 6.5  # the width of an axis label's character, roughly (11 px text)


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per bucket; None: nothing measured there (a gap in the line)
    css: str  # the stylesheet class giving its colour (s1, s2, …)


def _nice_max(top: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `top` (the y axis' end)."""
    if top <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(top))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= top:
            return step * power
    return 10 * power


def _time_label(ms: int, span_ms: int) -> str:
    moment = time.gmtime(ms / 1000)
    if span_ms <= 2 * 86_400_000:
        return time.strftime("%H:%M", moment)
    return time.strftime("%d %b", moment)


def time_series(
    title: str, starts: Sequence[int], step_ms: int, series: Sequence[Series], fmt: Callable[[float], str]
) -> Markup:
    """A line chart of `series` over the buckets starting at `starts` (UTC milliseconds), each `step_ms` long;
    `fmt` writes a value with its unit (axis labels and tooltips)."""
    known = [v for s in series for v in s.values if v is not None]
    top = _nice_max(max(known, default=0.0))
    ticks = [(top * i / 4, fmt(top * i / 4)) for i in range(5)]  # 0, ¼, ½, ¾ and all of the axis
    left = 14 + _CHAR * max(len(label) for _, label in ticks)
    width, height = WIDTH - left - _RIGHT, HEIGHT - _TOP - _BOTTOM
    count = max(len(starts), 1)
    span = step_ms * count

    def x(i: int) -> float:
        return left + (i + 0.5) * width / count

    def y(v: float) -> float:
        return _TOP + height - v / top * height

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for value, label in ticks:  # grid lines and the y axis' labels
        py = y(value)
        parts.append(f'<line class="grid" x1="{left:.0f}" x2="{WIDTH - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>')
        anchor = f'x="{left - 6:.0f}" y="{py + 4:.1f}" text-anchor="end"'
        parts.append(f'<text class="axis" {anchor}>{escape(label)}</text>')
    for i in range(0, count, max(count // 6, 1)):  # about six time labels
        if i < len(starts):
            label = escape(_time_label(starts[i], span))
            parts.append(f'<text class="axis" x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{label}</text>')
    for s in series:
        runs: list[list[str]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                runs.append([])
                continue
            runs[-1].append(f"{x(i):.1f},{y(v):.1f}")
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline class="line {s.css}" points="{" ".join(run)}"/>')
        for i, v in enumerate(s.values):
            if v is None:
                continue
            tip = escape(f"{s.name} · {_time_label(starts[i], span)} · {fmt(v)}")
            dot = f'<circle class="dot {s.css}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5">'
            parts.append(f"{dot}<title>{tip}</title></circle>")
    if not known:
        middle = f'x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle"'
        parts.append(f'<text class="empty" {middle}>Nothing measured in this range</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bars(title: str, rows: Sequence[tuple[str, float, str]]) -> Markup:
    """Horizontal bars, one per (label, value, the value as shown), longest first as given."""
    top = max((value for _, value, _ in rows), default=0.0) or 1.0
    row_height, label_width = 26, 200
    height = max(len(rows), 1) * row_height + 8
    parts = [
        f'<svg class="bars" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i, (label, value, shown) in enumerate(rows):
        y = 4 + i * row_height
        length = max(value / top * (WIDTH - label_width - 180), 1.0)  # room after it for the value
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(f'<text class="label" x="0" y="{y + 17}"><title>{escape(label)}</title>{escape(short)}</text>')
        parts.append(f'<rect class="bar" x="{label_width}" y="{y + 4}" width="{length:.1f}" height="16" rx="3"/>')
        parts.append(f'<text class="value" x="{label_width + length + 6:.1f}" y="{y + 17}">{escape(shown)}</text>')
    if not rows:
        parts.append(f'<text class="empty" x="{WIDTH / 2}" y="20" text-anchor="middle">Nothing yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
