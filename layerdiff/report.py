"""One self-contained HTML page of a run's results that opens offline in any browser.

Each stage is a section: its summary numbers, its pictures (referenced by paths relative to the
page, so the page and the pictures move together) and its training curves, drawn here as inline
SVG from the logged metric series. No scripts, styles or fonts from the network.
"""

from __future__ import annotations

import csv
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerdiff.files import write_atomically

Series = Sequence[tuple[int, float]]  # (step, value), in logging order
CURVE_WIDTH, CURVE_HEIGHT = 360, 180
CURVE_MARGIN = {"left": 56, "right": 12, "top": 24, "bottom": 28}


@dataclass(frozen=True)
class Picture:
    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    """One stage of the page: a title, a line saying what it shows, numbers, pictures, curves."""

    title: str
    description: str = ""
    numbers: Mapping[str, float | int | str] = field(default_factory=dict)
    pictures: Sequence[Picture] = ()
    curves: Mapping[str, Series] = field(default_factory=dict)


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every column of a Lightning ``CSVLogger`` ``metrics.csv`` (one row per logging call, empty
    cells for metrics that call did not log) as a series of (step, value)."""
    path = Path(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "step" not in rows[0]:
        raise ValueError(f"{path} has no 'step' column; expected the metrics.csv of Lightning's CSVLogger")
    series: dict[str, list[tuple[int, float]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            step = int(float(row["step"]))
        except ValueError:
            raise ValueError(f"{path} line {line}: step {row['step']!r} is not a number") from None
        for name, cell in row.items():
            if name in ("step", "epoch") or cell in ("", None):
                continue
            series.setdefault(name, []).append((step, float(cell)))
    return series


def format_number(value: float | int | str) -> str:
    """Integers with thousands separators, floats with four significant digits."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def curve_points(series: Series, width: int = CURVE_WIDTH, height: int = CURVE_HEIGHT) -> list[tuple[float, float]]:
    """The finite points of ``series`` in SVG coordinates: steps left to right, values bottom to
    top, each spanning the plot area (a constant series or a single step sits in the middle)."""
    finite = [(step, value) for step, value in series if math.isfinite(value)]
    if not finite:
        return []
    left, top = CURVE_MARGIN["left"], CURVE_MARGIN["top"]
    plot_width = width - left - CURVE_MARGIN["right"]
    plot_height = height - top - CURVE_MARGIN["bottom"]
    steps, values = [step for step, _ in finite], [value for _, value in finite]
    step_low, step_span = min(steps), max(steps) - min(steps)
    value_low, value_span = min(values), max(values) - min(values)
    return [
        (
            left + (plot_width * (step - step_low) / step_span if step_span else plot_width / 2),
            top + plot_height * (1 - ((value - value_low) / value_span if value_span else 0.5)),
        )
        for step, value in finite
    ]


def curve_svg(name: str, series: Series, width: int = CURVE_WIDTH, height: int = CURVE_HEIGHT) -> str:
    """A line chart of one metric: axes labelled with the first and last step and the lowest and
    highest value; the points are ``curve_points``."""
    points = curve_points(series, width, height)
    finite = [(step, value) for step, value in series if math.isfinite(value)]
    left, top = CURVE_MARGIN["left"], CURVE_MARGIN["top"]
    right, bottom = width - CURVE_MARGIN["right"], height - CURVE_MARGIN["bottom"]
    parts = [
        f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(name)}">',
        f'<text x="{left}" y="16" class="title">{html.escape(name)}</text>',
        f'<polyline class="axes" points="{left},{top} {left},{bottom} {right},{bottom}"/>',
    ]
    if not points:
        parts.append(f'<text x="{left + 8}" y="{(top + bottom) / 2}">no finite values</text>')
    else:
        steps, values = [step for step, _ in finite], [value for _, value in finite]
        parts += [
            f'<text x="{left - 4}" y="{top + 4}" class="y">{format_number(max(values))}</text>',
            f'<text x="{left - 4}" y="{bottom}" class="y">{format_number(min(values))}</text>',
            f'<text x="{left}" y="{bottom + 16}">{format_number(min(steps))}</text>',
            f'<text x="{right}" y="{bottom + 16}" class="end">step {format_number(max(steps))}</text>',
            f'<polyline class="line" data-series="{html.escape(name)}" points="'
            + " ".join(f"{x:.2f},{y:.2f}" for x, y in points)
            + '"/>',
        ]
        if len(points) == 1:
            parts.append(f'<circle cx="{points[0][0]:.2f}" cy="{points[0][1]:.2f}" r="3"/>')
    return "\n".join(parts + ["</svg>"])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } section { border-top: 1px solid #ddd; padding: 0.5rem 0 1.5rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
td { padding: 0.15rem 1rem 0.15rem 0; } td.value { font-variant-numeric: tabular-nums; text-align: right; }
.pictures, .curves { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85rem; color: #555; max-width: 32rem; }
figure img { max-width: 32rem; image-rendering: pixelated; border: 1px solid #ccc; }
svg.curve { font-size: 11px; background: #fafafa; border: 1px solid #e4e4e4; }
svg .title { font-weight: 600; } svg .y { text-anchor: end; } svg .end { text-anchor: end; }
svg .axes { fill: none; stroke: #999; } svg .line { fill: none; stroke: #1f6fb4; stroke-width: 1.5; }
"""


def render_section(section: Section, page_directory: Path) -> str:
    parts = [f"<section>\n<h2>{html.escape(section.title)}</h2>"]
    if section.description:
        parts.append(f"<p>{html.escape(section.description)}</p>")
    if section.numbers:
        rows = "".join(
            f'<tr><td>{html.escape(name)}</td><td class="value">{html.escape(format_number(value))}</td></tr>'
            for name, value in section.numbers.items()
        )
        parts.append(f"<table>{rows}</table>")
    if section.pictures:
        figures = []
        for picture in section.pictures:
            source = Path(os.path.relpath(Path(picture.path).resolve(), page_directory.resolve())).as_posix()
            caption = html.escape(picture.caption)
            figures.append(
                f'<figure><img src="{html.escape(source)}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
            )
        parts.append('<div class="pictures">' + "".join(figures) + "</div>")
    if section.curves:
        charts = "".join(curve_svg(name, series) for name, series in section.curves.items())
        parts.append(f'<div class="curves">{charts}</div>')
    return "\n".join(parts + ["</section>"])


def write_report(
    path: str | os.PathLike, title: str, sections: Sequence[Section], numbers: Mapping[str, float | int | str] | None = None
) -> Path:
    """Write the page to ``path`` (atomically): ``numbers`` first as a summary table, then each
    section. Every picture must exist when the page is written."""
    path = Path(path)
    missing = [str(picture.path) for section in sections for picture in section.pictures if not Path(picture.path).is_file()]
    if missing:
        raise FileNotFoundError(f"The report {path} would show pictures that do not exist: {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = Section("Summary", numbers=numbers) if numbers else None
    body = "\n".join(render_section(section, path.parent) for section in ([summary] if summary else []) + list(sections))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
    write_atomically(path, page.encode())
    return path
