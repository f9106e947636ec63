"""The results page (``layerdiff.report``): every picture it references exists, its curves are the
logged series, metrics round-trip through a real ``CSVLogger``, and headless Chromium loads every
image of the page (and notices one that is missing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from layerdiff.report import Picture, Section, curve_points, read_metrics_csv, write_report

SKIP_VARIABLE = "LAYERDIFF_SKIP_BROWSER_TESTS"
# marks each image once the page has loaded: a broken or missing one has naturalWidth 0
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  for (const image of document.images) image.dataset.loaded = image.naturalWidth > 0 ? "yes" : "no";
  document.body.dataset.checked = "yes";
});
</script>"""


class PageParts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.polylines: dict[str, str] = {}
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "polyline" and "data-series" in attributes:
            self.polylines[attributes["data-series"]] = attributes["points"]
        elif tag == "body":
            self.body = attributes


def parse(text: str) -> PageParts:
    parts = PageParts()
    parts.feed(text)
    return parts


def write_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A report in ``site/`` with pictures beside it and in another folder, two stages, two curves."""
    pictures = [write_png(tmp_path / "run" / "images" / f"step{step}.png", step) for step in (0, 40)]
    sheet = write_png(tmp_path / "site" / "generated" / "contact sheet.png", 7)
    stages = [
        Section(
            "Stage one",
            "before and after",
            {"alpha MSE before": 0.2245, "steps": 40000},
            [Picture(pictures[0], "step 0"), Picture(pictures[1], "step 40")],
            {"train/loss": [(0, 1.0), (10, 0.5), (20, 0.25), (40, 0.2)], "val/loss": [(0, 0.9), (40, 0.3)]},
        ),
        Section("Stage two", pictures=[Picture(sheet, "contact sheet")]),
    ]
    return write_report(tmp_path / "site" / "index.html", "demo", stages, {"seconds": 215.3})


def test_every_referenced_picture_exists_and_curves_are_the_series(page: Path) -> None:
    text = page.read_text()
    parts = parse(text)
    sources = [image["src"] for image in parts.images]
    assert len(sources) == 3
    assert all((page.parent / source).is_file() for source in sources), sources
    assert not any(source.startswith(("/", "http")) for source in sources)  # relative: page and pictures move together
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing from the network
    assert "40,000" in text and "0.2245" in text and "215.3" in text

    series = {"train/loss": [(0, 1.0), (10, 0.5), (20, 0.25), (40, 0.2)], "val/loss": [(0, 0.9), (40, 0.3)]}
    assert set(parts.polylines) == set(series)
    for name, points in series.items():
        drawn = [tuple(map(float, point.split(","))) for point in parts.polylines[name].split()]
        assert len(drawn) == len(points)
        xs, ys = np.array([x for x, _ in drawn]), np.array([y for _, y in drawn])
        steps, values = np.array([s for s, _ in points], float), np.array([v for _, v in points])
        # x grows with the step, y falls as the value rises, both in proportion (up to the 2-decimal rounding)
        np.testing.assert_allclose((xs - xs[0]) / (xs[-1] - xs[0]), (steps - steps[0]) / (steps[-1] - steps[0]), atol=1e-3)
        np.testing.assert_allclose((ys.max() - ys) / (ys.max() - ys.min()),
                                   (values - values.min()) / (values.max() - values.min()), atol=1e-3)  # fmt: skip


def test_degenerate_series_and_missing_pictures(tmp_path: Path) -> None:
    assert curve_points([]) == []
    assert curve_points([(5, float("nan"))]) == []
    (x, y), = curve_points([(5, 2.0)])
    flat = curve_points([(0, 1.0), (10, 1.0)])
    assert flat[0][1] == flat[1][1] == y and flat[0][0] < x < flat[1][0]  # a lone point sits in the middle
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        write_report(tmp_path / "index.html", "t", [Section("s", pictures=[Picture(tmp_path / "nowhere.png", "gone")])])


def test_metrics_round_trip_through_csv_logger(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="", version="metrics")
    logger.log_metrics({"val/loss": 0.9}, step=0)
    for step in (10, 20):
        logger.log_metrics({"train/loss": 1.0 / step, "epoch": 0}, step=step)
    logger.log_metrics({"val/loss": 0.3}, step=20)
    logger.save()
    series = read_metrics_csv(tmp_path / "metrics" / "metrics.csv")
    assert series == {"val/loss": [(0, 0.9), (20, 0.3)], "train/loss": [(10, 0.1), (20, 0.05)]}
    (tmp_path / "bad.csv").write_text("loss\n1.0\n")
    with pytest.raises(ValueError, match="bad.csv has no 'step' column"):
        read_metrics_csv(tmp_path / "bad.csv")


def chromium() -> str:
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the headless-browser tests are skipped on this machine")
    program = shutil.which("chromium") or shutil.which("chromium-browser")
    if program is None:
        pytest.fail(f"The report tests need Debian's chromium: run `bash scripts/test_packages.sh browser` as root "
                    f"(scripts/test.sh does), or set {SKIP_VARIABLE}=1 to skip them.")  # fmt: skip
    return program


def image_states(page: Path, profile: Path) -> dict[str, str]:
    """Each image of ``page`` -> "yes"/"no": did headless Chromium load it? (A copy of the page
    beside it gets the check script, so relative paths resolve the same.)"""
    probe = page.with_name(".image_check.html")
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = parse(result.stdout)
    assert parts.body.get("data-checked") == "yes", f"the page never finished loading:\n{result.stdout[:2000]}"
    return {image["src"]: image.get("data-loaded", "unmarked") for image in parts.images}


@pytest.mark.slow
def test_chromium_loads_every_image_and_notices_a_missing_one(page: Path, tmp_path: Path) -> None:
    states = image_states(page, tmp_path / "profile")
    assert len(states) == 3 and set(states.values()) == {"yes"}, states
    missing = next(source for source in states if re.search("step40", source))
    (page.parent / missing).unlink()
    states = image_states(page, tmp_path / "profile")
    assert states.pop(missing) == "no"
    assert set(states.values()) == {"yes"}, states
