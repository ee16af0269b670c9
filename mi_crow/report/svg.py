"""Small, dependency-free SVG charts for the feature report (line charts and histograms).

The charts are plain strings of SVG markup meant to be inlined into HTML. Every text that ends up in the markup is
escaped, so labels may contain ``<`` or ``&``.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def _fmt(value: float) -> str:
    """Short human label for an axis tick."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    mag = abs(value)
    if mag >= 1e6 or mag < 1e-3:
        return f"{value:.1e}"
    if mag >= 100:
        return f"{value:,.0f}"
    if mag >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks or [lo]


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str = "",
    y_label: str = "",
    log_y: bool = False,
    width: int = 420,
    height: int = 240,
) -> str:
    """Render one or more ``(x, y)`` series as an SVG line chart.

    Args:
        series: name -> points; non-finite points (and, with ``log_y``, non-positive ones) are skipped.
        title: chart title.
        x_label: label under the x axis.
        y_label: label of the y axis.
        log_y: log10 scale on the y axis.
        width: width in pixels.
        height: height in pixels.

    Returns:
        The ``<svg>`` markup.
    """
    left, right, top, bottom = 56, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    clean: dict[str, list[tuple[float, float]]] = {}
    for name, pts in series.items():
        keep = []
        for x, y in pts:
            if x is None or y is None:
                continue
            x, y = float(x), float(y)
            if not (math.isfinite(x) and math.isfinite(y)) or (log_y and y <= 0):
                continue
            keep.append((x, math.log10(y) if log_y else y))
        if keep:
            clean[name] = keep
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>',
    ]
    if not clean:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" class="muted">'
                     "no data</text></svg>")
        return "".join(parts)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-bg"/>')
    if log_y:
        yticks = [float(t) for t in range(math.ceil(y0), math.floor(y1) + 1)] or _nice_ticks(y0, y1)
    else:
        yticks = _nice_ticks(y0, y1)
    for t in yticks:
        if y0 <= t <= y1:
            label = _fmt(10 ** t) if log_y else _fmt(t)
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                         f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t in _nice_ticks(x0, x1):
        if x0 <= t <= x1:
            parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">'
                         f"{_fmt(t)}</text>")
    for i, (name, pts) in enumerate(clean.items()):
        color = _PALETTE[i % len(_PALETTE)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.6">'
                     f"<title>{escape(name)}</title></path>")
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        if len(clean) > 1:
            parts.append(f'<rect x="{left + 8}" y="{top + 6 + 14 * i}" width="10" height="3" fill="{color}"/>'
                         f'<text x="{left + 22}" y="{top + 11 + 14 * i}" class="legend">{escape(name)}</text>')
    if x_label:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis-label">'
                     f"{escape(x_label)}</text>")
    if y_label:
        parts.append(f'<text x="12" y="{top + ph / 2:.0f}" text-anchor="middle" class="axis-label" '
                     f'transform="rotate(-90 12 {top + ph / 2:.0f})">{escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(
    counts: Sequence[float],
    edges: Sequence[float],
    *,
    title: str,
    x_label: str = "",
    y_label: str = "count",
    edge_labels: Sequence[str] | None = None,
    width: int = 420,
    height: int = 240,
    color: str = "#2563eb",
) -> str:
    """Render a histogram (``len(edges) == len(counts) + 1``) as SVG bars.

    Args:
        counts: height of each bin.
        edges: bin edges, increasing.
        title: chart title.
        x_label: label under the x axis.
        y_label: label of the y axis.
        edge_labels: tick label for each edge (default: the edge value).
        width: width in pixels.
        height: height in pixels.
        color: bar colour.

    Returns:
        The ``<svg>`` markup.
    """
    if len(edges) != len(counts) + 1:
        raise ValueError(f"edges must have len(counts) + 1 = {len(counts) + 1} entries, got {len(edges)}")
    if edge_labels is not None and len(edge_labels) != len(edges):
        raise ValueError(f"edge_labels must have {len(edges)} entries, got {len(edge_labels)}")
    left, right, top, bottom = 56, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-bg"/>',
    ]
    cmax = max((float(c) for c in counts), default=0.0)
    if cmax <= 0:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" class="muted">'
                     "no data</text></svg>")
        return "".join(parts)
    e0, e1 = float(edges[0]), float(edges[-1])

    def sx(x: float) -> float:
        return left + (x - e0) / (e1 - e0) * pw

    for t in _nice_ticks(0, cmax):
        y = top + ph - t / cmax * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        h = float(c) / cmax * ph
        if h > 0:
            parts.append(f'<rect x="{sx(a) + 0.5:.1f}" y="{top + ph - h:.1f}" width="{max(sx(b) - sx(a) - 1, 0.5):.1f}"'
                         f' height="{h:.1f}" fill="{color}"><title>{_fmt(float(c))}</title></rect>')
    if edge_labels is not None:
        # Caller-chosen labels: draw every non-empty one (blank entries are how a caller thins them out).
        ticks = [i for i, label in enumerate(edge_labels) if label]
        labels = list(edge_labels)
    else:
        ticks = list(range(0, len(edges), max(1, len(edges) // 8)))
        labels = [_fmt(float(e)) for e in edges]
    for i in ticks:
        parts.append(f'<text x="{sx(float(edges[i])):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">'
                     f"{escape(labels[i])}</text>")
    if x_label:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis-label">'
                     f"{escape(x_label)}</text>")
    if y_label:
        parts.append(f'<text x="12" y="{top + ph / 2:.0f}" text-anchor="middle" class="axis-label" '
                     f'transform="rotate(-90 12 {top + ph / 2:.0f})">{escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
