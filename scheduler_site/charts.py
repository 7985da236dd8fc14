"""Charts as inline SVG, drawn on the server: no JavaScript library, no CDN, works offline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

COLORS = {
    "QUEUED": "#6c8ebf",
    "DISPATCHED": "#9673a6",
    "RUNNING": "#d6b656",
    "COMPLETED": "#82b366",
    "FAILED": "#e07b39",
    "DEAD": "#b85450",
    "CANCELLED": "#999999",
    "EXPIRED": "#a0785a",
    "SUBMITTED": "#6c8ebf",
    "DONE": "#82b366",
    "failed attempts": "#f0b27a",
}


def _color(key: str) -> str:
    return COLORS.get(key, "#888888")


def stacked_bars(
    rows: Sequence[tuple[str, Mapping[str, int]]], keys: Sequence[str], *, title: str
) -> SafeString:
    """One horizontal bar per row, stacked by key, with a legend."""
    width, bar_h, gap, label_w = 640, 18, 8, 170
    height = max(len(rows), 1) * (bar_h + gap) + 40
    top = max([sum(values.get(k, 0) for k in keys) for _, values in rows] + [1])
    scale = (width - label_w - 60) / top
    parts: list[SafeString] = []
    for index, (label, values) in enumerate(rows):
        y = 10 + index * (bar_h + gap)
        parts.append(format_html('<text x="0" y="{}" class="label">{}</text>', y + 13, label[:26]))
        x = float(label_w)
        for key in keys:
            n = values.get(key, 0)
            if n:
                w = max(n * scale, 1.5)
                parts.append(_rect(x, y, w, bar_h, _color(key), f"{label} {key}: {n}"))
                x += w
        total = sum(values.get(k, 0) for k in keys)
        parts.append(
            format_html(
                '<text x="{}" y="{}" class="value">{}</text>', f"{x + 4:.1f}", y + 13, total
            )
        )
    parts.append(_legend(keys, y=height - 12))
    return _svg(width, height, title, parts)


def hourly_columns(
    hours: Sequence[str], series: Mapping[str, Sequence[int]], *, title: str
) -> SafeString:
    """Side-by-side columns per hour for each series (e.g. COMPLETED and FAILED)."""
    width, height, bottom, left = 640, 220, 30, 30
    top = max([max(values, default=0) for values in series.values()] + [1])
    slot = (width - left) / max(len(hours), 1)
    bar_w = max(slot / (len(series) + 1), 1)
    parts: list[SafeString] = [
        format_html('<text x="0" y="12" class="value">{}</text>', top),
        format_html(
            '<line x1="{}" y1="{}" x2="{}" y2="{}" class="axis"/>',
            left,
            height - bottom,
            width,
            height - bottom,
        ),
    ]
    for h_index, hour in enumerate(hours):
        for s_index, (name, values) in enumerate(series.items()):
            n = values[h_index]
            bar_h = (height - bottom - 20) * n / top
            x = left + h_index * slot + s_index * bar_w
            tip = f"{hour} {name}: {n}"
            parts.append(_rect(x, height - bottom - bar_h, bar_w, bar_h, _color(name), tip))
        if h_index % 3 == 0:
            parts.append(
                format_html(
                    '<text x="{}" y="{}" class="tick">{}</text>',
                    f"{left + h_index * slot:.1f}",
                    height - bottom + 14,
                    hour,
                )
            )
    parts.append(_legend(list(series), y=height - 2))
    return _svg(width, height, title, parts)


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str) -> SafeString:
    return format_html(
        '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}</title></rect>',
        f"{x:.1f}",
        f"{y:.1f}",
        f"{w:.1f}",
        f"{h:.1f}",
        fill,
        tip,
    )


def _legend(keys: Sequence[str], *, y: int) -> SafeString:
    return format_html_join(
        "",
        '<rect x="{}" y="{}" width="10" height="10" fill="{}"/>'
        '<text x="{}" y="{}" class="tick">{}</text>',
        ((i * 95, y - 9, _color(k), i * 95 + 14, y, k) for i, k in enumerate(keys)),
    )


def _svg(width: int, height: int, title: str, parts: Sequence[SafeString]) -> SafeString:
    body = mark_safe("".join(parts))  # every part was built with format_html (escaped)
    return format_html(
        '<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {} {}" width="100%" '
        'xmlns="http://www.w3.org/2000/svg"><title>{}</title>{}</svg>',
        title,
        width,
        height,
        title,
        body,
    )
