"""The L0-FVU frontier of a grid of SAEs as inline SVG: one dot per SAE (coloured by layer), the Pareto frontier
(no other SAE has both a lower or equal L0 and a lower or equal FVU, one of them strictly) joined by a line.

The points are those `SaeGrid` writes to ``sae_models/<grid_id>.frontier.json`` (dicts with ``l0``, ``fvu`` and
optionally ``sae_id``, ``layer``, ``k``, ``n_latents``, ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from mi_crow.report.svg import _PALETTE, _fmt, _nice_ticks
from mi_crow.validation import fail, fail_type

__all__ = ["frontier_svg", "load_frontier", "pareto_front"]


def _clean(points: Sequence[Any]) -> list[dict[str, Any]]:
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise fail_type("points", "a list of dicts with 'l0' and 'fvu'", points)
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise fail_type(f"points[{i}]", "a dict with 'l0' and 'fvu'", point)
        if "l0" not in point or "fvu" not in point:
            raise fail(f"points[{i}]", "a dict with 'l0' and 'fvu'", point)
        l0, fvu = point["l0"], point["fvu"]
        if l0 is None or fvu is None or not (math.isfinite(float(l0)) and math.isfinite(float(fvu))):
            continue  # an SAE without a logged record (or a non-finite one) has no place on the chart
        out.append({**point, "l0": float(l0), "fvu": float(fvu)})
    return out


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point dominates (lower-or-equal L0 and FVU, one strictly lower), by increasing L0.

    Points without a finite ``l0`` and ``fvu`` are left out.
    """
    clean = _clean(points)
    front = [
        p for p in clean
        if not any(q["l0"] <= p["l0"] and q["fvu"] <= p["fvu"] and (q["l0"] < p["l0"] or q["fvu"] < p["fvu"])
                   for q in clean)
    ]
    return sorted(front, key=lambda p: (p["l0"], p["fvu"]))


def _label(point: dict[str, Any]) -> str:
    parts = [str(point["sae_id"])] if point.get("sae_id") else []
    parts += [f"{key}={point[key]}" for key in ("layer", "k", "n_latents", "seed") if point.get(key) is not None]
    parts += [f"L0={point['l0']:.4g}", f"FVU={point['fvu']:.4g}"]
    return ", ".join(parts)


def frontier_svg(points: Sequence[dict[str, Any]], *, title: str = "L0 vs FVU of the SAE grid",
                 width: int = 460, height: int = 280) -> str:
    """Render the grid's points as an SVG scatter plot with the Pareto frontier (lower left is better).

    Args:
        points: dicts with ``l0`` and ``fvu`` (and optionally ``sae_id``, ``layer``, ``k``, ``n_latents``,
            ``seed``, shown in each dot's tooltip); points without finite values are skipped.
        title: chart title.
        width, height: size in pixels.

    Returns:
        The ``<svg>`` markup (every label escaped): one ``<circle class="sae">`` per point and a
        ``<path class="frontier">`` through the Pareto points.
    """
    clean = _clean(points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart frontier" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="chart-title">{escape(title)}</text>',
    ]
    if not clean:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" class="muted">'
                     "no data</text></svg>")
        return "".join(parts)
    left, right, top, bottom = 56, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p["l0"] for p in clean], [p["fvu"] for p in clean]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x_pad = (x1 - x0) * 0.05 or max(abs(x0) * 0.1, 1.0)
    y_pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.1, 0.01)
    x0, x1, y0, y1 = x0 - x_pad, x1 + x_pad, y0 - y_pad, y1 + y_pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-bg"/>')
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                         f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1):
        if x0 <= t <= x1:
            parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">'
                         f"{_fmt(t)}</text>")
    front = pareto_front(clean)
    if len(front) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(p['l0']):.1f},{sy(p['fvu']):.1f}" for i, p in enumerate(front))
        parts.append(f'<path class="frontier" d="{path}" fill="none" stroke="#111827" stroke-width="1.2" '
                     f'stroke-dasharray="4 3"><title>Pareto frontier</title></path>')
    groups = list(dict.fromkeys(str(p.get("layer", "")) for p in clean))
    for p in clean:
        color = _PALETTE[groups.index(str(p.get("layer", ""))) % len(_PALETTE)]
        parts.append(f'<circle class="sae" cx="{sx(p["l0"]):.1f}" cy="{sy(p["fvu"]):.1f}" r="4" fill="{color}" '
                     f'fill-opacity="0.85"><title>{escape(_label(p))}</title></circle>')
    if len(groups) > 1:
        for i, name in enumerate(groups):
            color = _PALETTE[i % len(_PALETTE)]
            parts.append(f'<circle cx="{left + pw - 110}" cy="{top + 8 + 14 * i}" r="4" fill="{color}"/>'
                         f'<text x="{left + pw - 102}" y="{top + 12 + 14 * i}" class="legend">{escape(name)}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis-label">'
                 "L0 (active latents per token)</text>")
    parts.append(f'<text x="12" y="{top + ph / 2:.0f}" text-anchor="middle" class="axis-label" '
                 f'transform="rotate(-90 12 {top + ph / 2:.0f})">FVU</text>')
    parts.append("</svg>")
    return "".join(parts)


def load_frontier(store: Any, grid_id: str) -> list[dict[str, Any]]:
    """The points `SaeGrid` wrote for ``grid_id`` (``sae_models/<grid_id>.frontier.json``)."""
    from mi_crow.mechanistic.sae.train.grid import FRONTIER_SUFFIX

    return list(store.get_json(f"sae_models/{grid_id}{FRONTIER_SUFFIX}")["points"])
