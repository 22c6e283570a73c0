"""The report as a reader sees it: series that coincide stay visible, figures span the page, and each
figure's legend is also text. The browser test opens the page in a real headless Chromium (skipped
where none is installed, e.g. ``apt-get install chromium``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import fedmtl
from fedmtl.experiment.report import PNG_LOSS, PNG_METRIC, write_report
from tests.conftest import digits_config

BLUE, ORANGE = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@pytest.fixture(scope="module")
def same_seed(tmp_path_factory) -> tuple[Path, list[Path]]:
    """FedAvg and Ditto with one seed: their global models, so their global-test curves, coincide."""
    root = tmp_path_factory.mktemp("same-seed")
    runs = [
        fedmtl.run(digits_config(train__rounds=4, algorithm={"name": a}), out=root / a).run_dir
        for a in ("fedavg", "ditto")
    ]
    return root, runs


def _pixels(png: Path, colour: np.ndarray) -> int:
    img = imread(png)[..., :3]
    return int((np.abs(img - colour).max(axis=-1) < 0.08).sum())


def test_coinciding_series_both_show_and_the_page_names_them(same_seed):
    root, runs = same_seed
    rows = [fedmtl.load_run(r) for r in runs]
    glob = [
        [r["global_accuracy"] for r in (rs.to_dict("records") if hasattr(rs, "to_dict") else rs)]
        for rs in rows
    ]
    assert glob[0] == glob[1]  # the premise: one curve under two legend entries
    page = write_report(runs, root / "rep").read_text()
    for png in (PNG_METRIC, PNG_LOSS):
        assert _pixels(root / "rep" / png, BLUE) > 200, png
        assert _pixels(root / "rep" / png, ORANGE) > 200, png
        assert imread(root / "rep" / png).shape[1] >= 1200  # the page's width, not half of it
    legends = page.split("<h2>Plots</h2>")[1].split('<ul class="legend">')[1:]
    assert len(legends) == 4
    for block in legends:
        items = block.split("</ul>")[0]
        assert "t (fedavg): blue solid line, circles" in items
        assert "t (ditto): orange dashed line, squares" in items


def _browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _headless(browser: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"]
    env = {**os.environ, "HOME": str(cwd)}  # a profile of its own
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


@pytest.mark.slow
def test_the_report_in_a_real_headless_browser(same_seed, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium or Chrome on this machine (apt-get install chromium)")
    root, runs = same_seed
    report = write_report(runs, tmp_path / "rep")
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _headless(browser, f"--screenshot={shot}", "--window-size=1400,2400", url, cwd=tmp_path)
    assert shot.is_file(), done.stderr[-2000:]
    img = imread(shot)[..., :3]
    ink = np.abs(img - 1.0).max(axis=-1) > 0.1  # not white
    assert ink.mean() > 0.05  # text, tables and plots: not a blank page
    columns = np.flatnonzero(ink.any(axis=0))
    assert columns.max() > 0.8 * img.shape[1]  # the figures span the page
    assert _pixels(shot, BLUE) > 200 and _pixels(shot, ORANGE) > 200  # the images were loaded
    dom = _headless(browser, "--dump-dom", url, cwd=tmp_path).stdout
    assert "<h1>fedmtl report</h1>" in dom
    plots = dom.split("<h2>Plots</h2>")[1]
    for name in ("t (fedavg)", "t (ditto)"):
        assert plots.count(f"<li>{name}: ") == 4  # every figure's legend lists every run
