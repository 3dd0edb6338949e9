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
from passuntil.report_figures import fig_forecast
from passuntil.scaling.forecast import read_forecast
from passuntil.store import Store

FIGURES = ("fig2_passed_vs_samples", "fig3_loss", "fig4_forecast", "fig_pass_at_k", "fig6_loss_vs_pu",
           "fig7_instances", "fig8_emergence", "metric_choice")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, series="sim")
    store = Store(out / "demo.sqlite")
    records = [read_forecast(p) for p in sorted(out.glob("*-forecast-*.json"))]
    data = load_report_data(store, store.runs(), forecasts=records)
    assert len(data.forecasts) == 2 and all(score is not None for _, score in data.forecasts)
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


def test_report_opens_with_a_run_summary_and_captions_every_figure(report):
    page = report.read_text()
    summary = page[page.index('<section id="run-summary">'):page.index("</section>")]
    for text in ("K (passes to stop at)", "budget (max samples per instance)", "3,000", "seed", "temperature",
                 "top-p", "top-k", "code-check isolation", "passuntil version", "simulated"):
        assert text in summary, text
    for model in ("0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B", "2.4B"):
        assert f"<td class=\"t\">{model}</td>" in summary
    assert '<td class="t">sim-scaling</td>' in summary and '<td class="n">20</td>' in summary
    assert page.index('id="run-summary"') < page.index("<figure")  # at the top
    assert "<b>observed</b>" in page and "unbiased PassUntil estimate" in page  # defined once, printed
    figures = re.findall(r'<figure id="(\w+)">(.*?)</figure>', page, re.S)
    assert [name for name, _ in figures] == list(FIGURES)
    for name, body in figures:
        caption = re.search(r"<figcaption>(.+)</figcaption>", body, re.S)
        assert caption and len(caption.group(1)) > 100, name
    fig4 = dict(figures)["fig4_forecast"]
    assert "forecast&#x27;s own fit" in fig4 and "open triangles on the top edge" in fig4
    assert "hold 100.0% of the counted samples" in dict(figures)["metric_choice"]
    table = page[page.index("<h2>Forecasts against outcomes</h2>"):]
    assert "nan" not in table.split("</table>")[0].lower()
    # both interval kinds labelled, what each forecast was scored against, and its warnings (made before)
    for text in ("these instances", "population", "scored against", "warnings (recorded before the target"):
        assert text in table.split("</table>")[0], text
    assert "<b>these instances</b>" in page and "<b>population</b>" in page
    pass_at_k = dict(figures)["fig_pass_at_k"]
    assert "1 - (1 - p_i)^k" in pass_at_k and "k = 1 ... 10^6" in pass_at_k


def test_zero_pass_sizes_are_counted_and_drawn_on_the_top_edge():
    rows = [{"task": "t", "model": m, "n_params": n, "instance_id": str(i), "passes": k, "samples": 100,
             "pu": k / 100, "pu_unbiased": k / 100}
            for m, n, k in (("a", 1e6, 0), ("b", 1e7, 0), ("c", 1e8, 3), ("d", 1e9, 30)) for i in range(5)]
    fig, caption = fig_forecast(pd.DataFrame(rows), ["t"], [])
    assert "2 model x task cell(s) where no instance passed" in caption
    ax = fig.axes[0]
    tops = [line for line in ax.lines if line.get_label() == "observed 0 (top edge)"]
    assert len(tops) == 1 and list(tops[0].get_xdata()) == [1e6, 1e7]
    assert "observed mean PU" in [t.get_text() for t in ax.get_legend().get_texts()]


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
    assert dom.stdout.count("<figcaption>") == len(FIGURES) and 'id="run-summary"' in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and re.search(r"error|Uncaught", line, re.I)]
    assert console_errors == []
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1300,2400", url],
                   capture_output=True, text=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # figures drawn, not a blank page


def test_a_sampled_cell_wins_over_the_exact_run_of_the_same_cell():
    """A demo store holds an exact run beside PassUntil's: the report draws PassUntil's counts for
    a cell both hold (whatever the runs' order), with the exact p from the exact run where the
    sampled run recorded none; a cell only the exact run holds stays exact."""
    from passuntil.report import _one_row_per_cell

    rows = pd.DataFrame([
        {"model": "m", "task": "t", "instance_id": "0", "stopped": "k", "samples": 40, "exact_p": None},
        {"model": "m", "task": "t", "instance_id": "0", "stopped": "exact", "samples": 0, "exact_p": 0.05},
        {"model": "m", "task": "t", "instance_id": "1", "stopped": "exact", "samples": 0, "exact_p": 0.2},
        {"model": "m", "task": "t", "instance_id": "1", "stopped": "budget", "samples": 30, "exact_p": 0.21}])
    out = _one_row_per_cell(rows).set_index("instance_id")
    assert len(out) == 2 and out.loc["0", "samples"] == 40 and out.loc["0", "exact_p"] == 0.05
    assert out.loc["1", "samples"] == 30 and out.loc["1", "exact_p"] == 0.21
    only_exact = _one_row_per_cell(rows.iloc[[2]]).iloc[0]
    assert only_exact["stopped"] == "exact" and only_exact["exact_p"] == 0.2
