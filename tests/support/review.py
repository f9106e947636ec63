"""What the round and review-page tests share: small fake round folders, the review server as a real
subprocess (``python -m data round review``), raw HTTP requests (paths as sent, not normalised), and
headless Chromium driven through Debian's chromium-driver."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from data.rounds import RoundManifest, RoundSample

REPO = Path(__file__).resolve().parents[2]
SKIP_VARIABLE = "LAYERDIFF_SKIP_BROWSER_TESTS"
URL_LINE = re.compile(r"review at (http://\S+)")


def write_fake_round(folder: Path, count: int, *, opaque: tuple[int, ...] = ()) -> RoundManifest:
    """A round folder of ``count`` tiny RGBA PNGs (a visible square on transparency; the indices in
    ``opaque`` fully opaque, which the shard writer drops) and its ``round.json``."""
    (folder / "generated").mkdir(parents=True)
    samples = []
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (16, 16, 4), dtype=np.uint8)
        if index not in opaque:
            pixels[..., 3] = 0
            pixels[3:13, 3:13, 3] = 255
        else:
            pixels[..., 3] = 255
        stem = f"{index:05d}_seed{100 + index}_prompt-{index}"
        Image.fromarray(pixels, "RGBA").save(folder / "generated" / f"{stem}.png")
        samples.append(RoundSample(stem, index, f"generated/{stem}.png", f"prompt number {index}", 100 + index))
    manifest = RoundManifest(folder.name, samples, model={"checkpoint": "/models/fake.ckpt"})
    manifest.save(folder)
    return manifest


class ReviewServer:
    """``python -m data round review ROUND_DIR`` in a subprocess, until ``kill`` (SIGKILL) or ``stop``."""

    def __init__(self, round_dir: Path) -> None:
        self.round_dir = round_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "data", "round", "review", str(round_dir), "--port", "0"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.url = self._wait_for_url(timeout=60)
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.removeprefix("token=")
        # keep reading, so a chatty server never blocks on a full pipe
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = URL_LINE.search(line)
            if match:
                return match[1]
        self.process.kill()
        raise AssertionError("the review server printed no URL:\n" + "".join(self.lines) + self.process.stdout.read())

    def page(self, token: str | None = None) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token if token is None else token}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send ``path`` exactly as given (no normalisation of ``..`` or percent escapes)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ReviewServer:
        return self

    def __exit__(self, *exception) -> None:
        self.stop()


def chromium_driver(profile: Path):
    """A headless Chromium under chromium-driver (selenium); skipped when ``LAYERDIFF_SKIP_BROWSER_TESTS=1``."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the headless-browser tests are skipped on this machine")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("The review-page tests need Debian's chromium and chromium-driver: run `bash scripts/test_packages.sh "
                    f"browser` as root (scripts/test.sh does), or set {SKIP_VARIABLE}=1 to skip them.")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))
