"""The streamem dashboard page as HTML: the run's state from the event log, rendered.

Runs on the scheduler (:mod:`streamem.dist.dashboard`), so it only formats strings:
:func:`page_state` picks the newest run's messages out of the ``streamem`` event log
and adds the E-step's chunk progress; :func:`render_body` turns that state into HTML
(the table, the FSC curves and class sizes as inline SVG, the PNGs the driver made);
:func:`render_page` wraps it in a self-contained page (no CDN, no script but the one
that re-fetches the body every 2 s). Everything shown that came from a message is
escaped, and an image is embedded only if its text is base64.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: The event-log topic the driver publishes to.
TOPIC = "streamem"
#: Where the page is, on the dashboard's server.
PAGE_PATH = "/streamem"
#: Seconds between the page's refreshes.
REFRESH_S = 2
#: What the page says before any run has published an iteration.
NO_RUN = "no streamem run yet"
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def page_state(events: Iterable[tuple[float, Any]], progress: dict | None = None) -> dict:
    """The page's state from the scheduler's ``streamem`` events ((time, message) pairs,
    oldest first; messages from :func:`streamem.dist.dashboard_payload.iteration_payload`).

    Returns {"run": None} before any message; else the newest run's folder, job,
    ``rows`` (one per iteration, in order; an iteration published again, after
    ``--continue``, replaces its row), ``latest`` (the newest message) and ``progress``
    (E-step tasks done and total of the iteration the scheduler saw last, from ``progress``:
    {"job", "iteration", "done", "total", "erred"}, or None).
    """
    latest = None
    rows: dict[int, dict] = {}
    for _, message in events:
        if not isinstance(message, dict) or "row" not in message or "run" not in message:
            continue
        if latest is None or message["run"] != latest["run"] or message["job"] != latest["job"]:
            rows = {}  # a new run: its own table
        rows[int(message["iteration"])] = message["row"]
        latest = message
    if latest is None:
        return {"run": None, "progress": progress}
    return {
        "run": latest["run"],
        "job": latest["job"],
        "rows": [rows[k] for k in sorted(rows)],
        "latest": latest,
        "progress": progress,
    }


def _text(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _img(png: Any, alt: str, width_px: int) -> str:
    if not isinstance(png, str) or not _BASE64.match(png):
        return ""
    return (
        f'<img src="data:image/png;base64,{png}" alt="{html.escape(alt)}" '
        f'style="width:{width_px}px;image-rendering:pixelated"/>'
    )


def svg_plot(
    series: Sequence[tuple[str, Sequence, Sequence]],
    x_label: str,
    y_label: str,
    element_id: str,
    y_range: tuple[float, float] | None = None,
    hlines: Sequence[float] = (),
    size_px: tuple[int, int] = (420, 260),
    integer_x: bool = False,
) -> str:
    """An inline SVG line plot: ``series`` of (label, xs, ys) (None or NaN points are
    skipped), dashed grey lines at the ``hlines`` values, a legend; ``integer_x``: ticks
    at whole numbers only (iterations)."""
    width, height = size_px
    left, right, top, bottom = 52, 12, 12, 40
    points = [
        [
            (float(x), float(y))
            for x, y in zip(xs, ys, strict=False)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        ]
        for _, xs, ys in series
    ]
    xs = [x for line in points for x, _ in line] or [0.0, 1.0]
    ys = [y for line in points for _, y in line] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range is not None else (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg id="{element_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" font-size="11" font-family="sans-serif">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#888"/>',
    ]
    for value in _ticks(y0, y1):
        parts.append(
            f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>'
        )
    for value in _ticks(x0, x1, integer_x):
        parts.append(
            f'<text x="{sx(value):.1f}" y="{height - bottom + 14}" '
            f'text-anchor="middle">{value:.3g}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">'
        f"{html.escape(y_label)}</text>"
    )
    for value in hlines:
        if y0 <= value <= y1:
            parts.append(
                f'<line x1="{left}" x2="{width - right}" y1="{sy(value):.1f}" '
                f'y2="{sy(value):.1f}" stroke="#999" stroke-dasharray="4 3"/>'
            )
    for k, ((label, _, _), line) in enumerate(zip(series, points, strict=True)):
        colour = _COLOURS[k % len(_COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        parts.append(
            f'<polyline class="series" fill="none" stroke="{colour}" '
            f'stroke-width="1.5" points="{path}"/>'
        )
        parts.append(
            f'<text x="{width - right - 4}" y="{top + 14 + 13 * k}" fill="{colour}" '
            f'text-anchor="end">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _ticks(low: float, high: float, integer: bool = False, most: int = 6) -> list[float]:
    """Round tick values in [low, high]: multiples of 1, 2 or 5 times a power of ten
    (whole numbers if ``integer``), at most ``most`` of them."""
    span = high - low
    base = 10.0 ** math.floor(math.log10(span / most)) if span > 0 else 1.0
    step = next(m * base for m in (1, 2, 5, 10) if span / (m * base) <= most)
    step = max(1.0, round(step)) if integer else step
    first = math.ceil(low / step - 1e-9)
    return [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]


def _table(rows: list[dict]) -> str:
    header = (
        "it",
        "resolution (Å)",
        "angular step (°)",
        "pose change (°)",
        "offset change (px)",
        "classes changed",
        "class sizes",
        "box",
        "seconds",
        "phases (s, all threads)",
    )
    out = ['<table id="iterations"><tr>', *(f"<th>{h}</th>" for h in header), "</tr>"]
    for row in rows:
        step = _text(row.get("angular_step_deg"))
        if row.get("local"):
            step += " (local)"
        changed = row.get("classes_changed")
        sizes = row.get("class_sizes") or []
        phases = row.get("phase_seconds") or {}
        cells = (
            _text(row.get("iteration")),
            _text(row.get("resolution_A")),
            step,
            _text(row.get("pose_change_deg")),
            _text(row.get("offset_change_px")),
            "–" if changed is None else f"{100 * changed:.1f}%",
            " ".join(_text(s, 3) for s in sizes),
            _text(row.get("box")),
            _text(row.get("seconds"), 1),
            " · ".join(f"{html.escape(str(k))} {_text(v, 1)}" for k, v in phases.items()),
        )
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _progress(progress: dict | None) -> str:
    if not progress or not progress.get("total"):
        return '<p id="progress">E-step: no chunk tasks seen yet</p>'
    done, total = int(progress["done"]), int(progress["total"])
    erred = f", {int(progress['erred'])} erred" if progress.get("erred") else ""
    return (
        f'<p id="progress">{html.escape(str(progress.get("job", "")))} iteration '
        f"{int(progress['iteration'])} E-step: <strong>{done} / {total}</strong> tasks done"
        f'{erred} <progress max="{total}" value="{done}"></progress></p>'
    )


def _section(title: str, body: str) -> str:
    return f'<div class="panel"><h3>{html.escape(title)}</h3>{body}</div>'


def render_body(state: dict) -> str:
    """The page's content for ``state`` (:func:`page_state`); ids for tests and scripts:
    ``current-iteration``, ``progress``, ``iterations``, ``fsc-plot``, ``map-slices``,
    ``class-sizes``, ``angdist``."""
    if state.get("run") is None:
        return f'<p id="no-run">{NO_RUN}</p>' + _progress(state.get("progress"))
    latest, rows = state["latest"], state["rows"]
    res = latest["row"].get("resolution_A")
    parts = [
        f'<h2>{html.escape(str(state["job"]))} — <span id="current-iteration">iteration '
        f'{int(latest["iteration"])}</span>, resolution <span id="resolution">{_text(res)}'
        f"</span> Å</h2>",
        f"<p>run folder {html.escape(str(state['run']))}; {int(latest['n_particles'])} "
        f"particles, box {int(latest['box_size'])} px of "
        f"{float(latest['pixel_size_A']):.3g} Å</p>",
        _progress(state.get("progress")),
        _table(rows),
    ]
    fsc = latest.get("fsc")
    if fsc:
        series = [(k, fsc["frequency_per_A"], c) for k, c in fsc["curves"].items()]
        y_range = (min(0.0, _low(series)), 1.0)
        plot = svg_plot(
            series, "spatial frequency (1/Å)", "FSC", "fsc-plot", y_range, hlines=(0.143, 0.5)
        )
        parts.append(_section(f"FSC, iteration {int(latest['iteration'])}", plot))
    images = latest.get("images") or []
    if images:
        class2d = latest["job"] == "class2d"
        width, title = (128, "class averages") if class2d else (160, "central sections")
        tiles = "".join(
            '<figure style="display:inline-block;margin:4px">'
            f"{_img(i.get('png'), i.get('label', ''), width)}"
            f"<figcaption>{html.escape(str(i.get('label', '')))}</figcaption></figure>"
            for i in images
        )
        parts.append(_section(title, f'<div id="map-slices">{tiles}</div>'))
    if len(rows[-1].get("class_sizes") or []) > 1:
        its = [r["iteration"] for r in rows]
        K = len(rows[-1]["class_sizes"])
        series = [(f"class {k + 1}", its, [_size(r, k) for r in rows]) for k in range(K)]
        plot = svg_plot(
            series, "iteration", "fraction of particles", "class-sizes", (0.0, 1.0), integer_x=True
        )
        parts.append(_section("class sizes", plot))
    angdist = latest.get("angdist")
    if angdist:
        caption = (
            f"tilt 0–180° (top to bottom) by rot −180–180°, 10° bins; "
            f"{int(angdist['n_poses'])} of {int(angdist['n_particles'])} particles, "
            f"most in a bin {int(angdist['max_count'])}"
        )
        body = f'<div id="angdist">{_img(angdist.get("png"), "angular distribution", 432)}'
        parts.append(_section("angular distribution", f"{body}<p>{caption}</p></div>"))
    return "".join(parts)


def _low(series) -> float:
    values = [y for _, _, ys in series for y in ys if y is not None and math.isfinite(y)]
    return min(values, default=0.0)


def _size(row: dict, k: int) -> float | None:
    sizes = row.get("class_sizes") or []
    return sizes[k] if k < len(sizes) else None


def render_page(state: dict) -> str:
    """The whole page: :func:`render_body` in a div that a small script re-fetches from
    ``<page>/fragment`` every :data:`REFRESH_S` seconds."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"/><title>streamem</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
.panel {{ display: inline-block; vertical-align: top; margin: 8px 16px 8px 0; }}
h3 {{ font-size: 14px; margin: 4px 0; }}
</style></head>
<body><h1>streamem</h1>
<div id="streamem">{render_body(state)}</div>
<script>
const fragment = location.pathname.replace(/\\/$/, "") + "/fragment";
setInterval(async () => {{
  try {{
    const reply = await fetch(fragment, {{cache: "no-store"}});
    if (reply.ok) document.getElementById("streamem").innerHTML = await reply.text();
  }} catch (error) {{}}
}}, {REFRESH_S * 1000});
</script></body></html>"""


def state_json(state: dict) -> str:
    """``state`` as JSON for ``<page>/state.json`` (images left out: they are in the page)."""
    latest = state.get("latest")
    if latest is not None:
        latest = {k: v for k, v in latest.items() if k not in ("images", "angdist")}
    return json.dumps({**state, "latest": latest})
