"""report.html rendered by headless Chromium: the Pareto plot's SVG is drawn, with points."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vitrank import reports

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # Offline and quiet: no network features, no first-run UI, a throw-away profile.
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",  # lets plotly finish drawing before the dump
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def _figure(dom: str, index: int) -> str:
    start = dom.find(f'id="figure-{index}"')
    assert start >= 0, f"figure-{index} is missing from the rendered page"
    end = dom.find(f'id="figure-{index + 1}"', start)
    return dom[start : end if end >= 0 else len(dom)]


def test_report_renders_in_headless_chromium(synthetic_run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    page = reports.build(synthetic_run).html
    url = page.resolve().as_uri()
    dumped = _run_chromium(binary, tmp_path / "profile", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    pareto = _figure(dumped.stdout, 0)
    assert "main-svg" in pareto, "plotly did not draw the Pareto plot's SVG"
    assert (
        len(re.findall(r'class="trace scatter', pareto)) >= 4
    )  # trials, front, baselines, winners
    run = reports.load_run(synthetic_run)
    points = len(re.findall(r'<path class="point"', pareto))
    # Every trial is a marker; baselines and winners are drawn again on top.
    assert points >= len(run.trials)

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    shot = _run_chromium(
        binary, tmp_path / "profile", "--window-size=1280,3600", f"--screenshot={screenshot}", url
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000
