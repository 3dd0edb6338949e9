"""The HTML report: every figure present, model text escaped, and it renders in Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from passuntil.demo import run_demo
from passuntil.report import load_report_data, write_report
from passuntil.store import Store

FIGURES = ("fig2_passed_vs_samples", "fig3_loss", "fig4_forecast", "fig6_loss_vs_pu",
           "fig7_instances", "fig8_emergence", "metric_choice")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, series="sim")
    store = Store(out / "demo.sqlite")
    data = load_report_data(store, store.runs())
    hostile = pd.DataFrame([{"model": "2.4B", "task": "sim-scaling", "instance_id": "00",
                             "text": "<script>alert('x')</script><img src=x onerror=alert(1)>",
                             "count": 10**9, "passed": False}])
    data.completions = pd.concat([data.completions, hostile], ignore_index=True)
    return write_report(data, out / "report")


def test_report_has_every_figure_and_escapes_model_text(report):
    page = report.read_text()
    for name in FIGURES:
        assert (report.parent / f"{name}.png").stat().st_size > 5000
        assert (report.parent / f"{name}.svg").exists()
        assert f'alt="{name}"' in page
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert" in page


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("PASSUNTIL_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required here (CI installs Debian's chromium)")
    if path is None:
        pytest.skip("chromium not installed (CI installs it: apt-get install chromium)")
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--enable-logging=stderr", "--v=0"]
    url = report.as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert f'data-images-loaded="{len(FIGURES)}/{len(FIGURES)}"' in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and re.search(r"error|Uncaught", line, re.I)]
    assert console_errors == []
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1300,2400", url],
                   capture_output=True, text=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # figures drawn, not a blank page
