"""Charts as inline SVG, drawn on the server: sparklines for the function list, and the bar and
line charts of a function's calls over time.  No script, no style attribute (the console's
Content-Security-Policy allows neither inline): colours come from classes in console.css."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

from impuls.engine.stats import Bucket


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _points(values: Sequence[float | None], width: float, height: float, top: float,
            pad: float = 1.0) -> str:
    """``x,y`` pairs of a polyline through ``values`` (None: 0), scaled to ``top``."""
    n = len(values)
    step = (width - 2 * pad) / max(n - 1, 1)
    scale = (height - 2 * pad) / top if top > 0 else 0
    return " ".join(f"{_num(pad + i * step)},{_num(height - pad - (v or 0) * scale)}"
                    for i, v in enumerate(values))


def sparkline(values: Sequence[float | None], errors: Sequence[float | None] | None = None,
              width: int = 120, height: int = 24, label: str = "") -> Markup:
    """A small line (and the errors as a second line, on the same scale)."""
    top = max([v or 0 for v in values] + [v or 0 for v in errors or ()] + [0])
    lines = [f'<polyline class="spark-line" points="{_points(values, width, height, top)}"/>']
    if errors is not None and any(errors):
        lines.append(f'<polyline class="spark-errors" points="{_points(errors, width, height, top)}"/>')
    return Markup(
        f'<svg class="sparkline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}" data-max="{_num(top)}">'
        f'<title>{escape(label)}</title>{"".join(lines)}</svg>')


def _time_label(ts: datetime, width_seconds: int) -> str:
    ts = ts.astimezone(UTC)
    return ts.strftime("%H:%M") if width_seconds < 3600 else ts.strftime("%d %H:%M")


def _nice_top(value: float) -> float:
    """A round number at or above ``value`` for the top of an axis."""
    if value <= 0:
        return 1
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 0.1
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


CHART_W, CHART_H = 760, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


def _frame(top: float, unit: str, buckets: Sequence[Bucket], width_seconds: int) -> list[str]:
    """Axes, grid lines with their values, and time labels."""
    inner_h = CHART_H - TOP - BOTTOM
    parts = []
    for i in range(5):
        value = top * i / 4
        y = TOP + inner_h - inner_h * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{CHART_W - RIGHT}" y1="{_num(y)}" y2="{_num(y)}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">'
                     f'{_num(value)}{escape(unit)}</text>')
    n = len(buckets)
    inner_w = CHART_W - LEFT - RIGHT
    for i in range(0, n, max(n // 6, 1)):
        x = LEFT + inner_w * i / n
        parts.append(f'<text class="axis" x="{_num(x)}" y="{CHART_H - 8}">'
                     f'{_time_label(buckets[i].start, width_seconds)}</text>')
    return parts


def bar_chart(buckets: Sequence[Bucket], width_seconds: int, title: str) -> Markup:
    """Calls per bucket as bars, the errors among them as red bars in front."""
    inner_w, inner_h = CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM
    top = _nice_top(max([b.count for b in buckets] + [0]))
    slot = inner_w / max(len(buckets), 1)
    parts = _frame(top, "", buckets, width_seconds)
    for i, b in enumerate(buckets):
        if not b.count:
            continue
        x = LEFT + i * slot + slot * 0.1
        for cls, value in (("bar", b.count), ("bar-errors", b.errors)):
            if value:
                h = inner_h * value / top
                parts.append(f'<rect class="{cls}" x="{_num(x)}" y="{_num(TOP + inner_h - h)}" '
                             f'width="{_num(slot * 0.8)}" height="{_num(h)}" data-count="{value}">'
                             f'<title>{_time_label(b.start, width_seconds)}: {value} '
                             f'{"calls" if cls == "bar" else "errors"}</title></rect>')
    total = sum(b.count for b in buckets)
    errors = sum(b.errors for b in buckets)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}" '
        f'data-total="{total}" data-errors="{errors}"><title>{escape(title)}</title>{"".join(parts)}</svg>')


def line_chart(buckets: Sequence[Bucket], width_seconds: int, percents: Sequence[int],
               title: str) -> Markup:
    """Duration percentiles per bucket as lines (a bucket without calls breaks the line)."""
    inner_w, inner_h = CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM
    values = [b.p(p) for b in buckets for p in percents]
    top = _nice_top(max([v for v in values if v is not None] + [0]))
    slot = inner_w / max(len(buckets), 1)
    parts = _frame(top, " ms", buckets, width_seconds)
    points = 0
    for p in percents:
        runs: list[list[str]] = [[]]
        for i, b in enumerate(buckets):
            v = b.p(p)
            if v is None:
                runs.append([])
                continue
            runs[-1].append(f"{_num(LEFT + (i + 0.5) * slot)},{_num(TOP + inner_h - inner_h * v / top)}")
            points += 1
        for run in runs:
            if len(run) == 1:
                x, y = run[0].split(",")
                parts.append(f'<circle class="line p{p}" cx="{x}" cy="{y}" r="2"/>')
            elif run:
                parts.append(f'<polyline class="line p{p}" points="{" ".join(run)}"/>')
    return Markup(
        f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}" '
        f'data-points="{points}"><title>{escape(title)}</title>{"".join(parts)}</svg>')
