"""`passuntil report`: one self-contained HTML page (figures embedded) plus PNG and SVG files.

The figures follow the paper on the user's own data: passed instances against sample count
(Fig. 2), reference test loss against N with its fit (Fig. 3), log(-log PU) against log N with
the pre-registered forecast and its interval (Fig. 4), test loss against PU (Fig. 6),
instance-level curves (Fig. 7), emergence classes with the two-circuit fit (Fig. 8), the
metric-choice panel, and a table of forecasts against outcomes. Model text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from passuntil.emergence import _hypotheses, classify, compare_hypotheses  # noqa: E402
from passuntil.evaluate import estimates_table  # noqa: E402
from passuntil.metrics import metric_table, sharpness  # noqa: E402
from passuntil.scaling.data import SeriesCounts  # noqa: E402
from passuntil.scaling.loss import fit_loss_law  # noqa: E402
from passuntil.store import Store  # noqa: E402


@dataclass
class ReportData:
    """What the report draws: the tidy results of the chosen runs, their completions, and any
    forecasts with their scores."""

    results: pd.DataFrame
    completions: pd.DataFrame
    k_target: int
    forecasts: list[tuple[dict, dict | None]] = field(default_factory=list)
    references: dict = field(default_factory=dict)


def load_report_data(store: Store, run_ids: list[str], forecasts=()) -> ReportData:
    frames = [estimates_table(store, r) for r in run_ids]
    results = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    results = results.drop_duplicates(["model", "task", "instance_id"], keep="last")
    comps = pd.concat([store.completions(r) for r in run_ids], ignore_index=True)
    k = store.run_config(run_ids[0])["engine"]["k_target"]
    refs = {}
    if not comps.empty:
        from passuntil.tasks import get_task

        for t in comps["task"].unique():
            refs.update({(t, x.id): x.references[0] for x in get_task(t).instances})
    return ReportData(results, comps, k, list(forecasts), refs)


def _counts(df: pd.DataFrame, k: int) -> SeriesCounts:
    return SeriesCounts.from_table(df, k_target=k)


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _grid(n: int):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def fig_passed_vs_samples(data: ReportData, tasks):
    """Fig. 2: how many instances have passed at least once within the first n samples."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = data.results[data.results["task"] == task]
        budget = max(2, int(g["samples"].max()))
        grid = np.unique(np.geomspace(1, budget, 30).astype(int))
        for model, gm in g.sort_values("n_params").groupby("model", sort=False):
            idxs = [json.loads(i) if isinstance(i, str) else list(i) for i in gm["pass_indices"]]
            first = [min(i) + 1 if i else np.inf for i in idxs]
            ax.plot(grid, [(np.asarray(first) <= n).sum() for n in grid], label=model)
        ax.set_xscale("log")
        _label(ax, task, "samples per instance", "instances passed")
    axes[0].legend(fontsize=7)
    return fig


def fig_loss(data: ReportData, tasks):
    """Fig. 3: the reference answers' mean test loss against N, with L(N) = (c/N)^a + L0."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = data.results[(data.results["task"] == task) & data.results["ref_tokens"].gt(0)]
        if g.empty:
            ax.set_title(f"{task}: no reference scores")
            continue
        per = (g.assign(loss=-g["ref_logprob"] / g["ref_tokens"]).groupby("n_params")["loss"].mean())
        ax.plot(per.index, per.values, "o", label="mean test loss")
        if len(per) >= 3:
            fit = fit_loss_law(per.index.to_numpy(), per.to_numpy())
            n = np.geomspace(per.index.min(), per.index.max() * 3, 50)
            ax.plot(n, fit.predict(n), "-", label=f"fit: alpha={fit.alpha:.2f}")
        ax.set_xscale("log")
        _label(ax, task, "N (non-embedding)", "loss (nats/token)")
        ax.legend(fontsize=7)
    return fig


def _f(pu):
    pu = np.clip(np.asarray(pu, dtype=float), 1e-300, 1 - 1e-12)
    return np.log(-np.log(pu))


def fig_forecast(data: ReportData, tasks):
    """Fig. 4: log(-log mean PU) against log N, with each pre-registered forecast."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = data.results[data.results["task"] == task]
        mean = g.groupby("n_params")["pu_unbiased"].mean()
        ok = mean > 0
        ax.plot(np.log(mean.index[ok]), _f(mean[ok]), "o", label="observed mean PU")
        for record, score in data.forecasts:
            if record["task"] != task:
                continue
            fc, tn = record["forecast"], record["target"]["n_params"]
            x = np.log(tn)
            ax.errorbar([x], [_f(fc["point"])],
                        yerr=[[_f(fc["point"]) - _f(fc["high"])], [_f(fc["low"]) - _f(fc["point"])]],
                        fmt="s", color="C3", capsize=4, label=f"forecast ({fc['level']:.0%} PI)")
            used = g[g["model"].isin(record["data"]["models"])].groupby("n_params")["pu_unbiased"]
            m = used.mean()
            m = m[m > 0]
            if len(m) >= 2:
                b = np.polyfit(np.log(m.index), _f(m), 1)
                xs = np.linspace(np.log(m.index.min()), x, 20)
                ax.plot(xs, np.polyval(b, xs), "--", color="C3", lw=1)
            if score is not None:
                ax.plot([x], [_f(score["observed"])], "*", color="k", ms=10, label="outcome")
        _label(ax, task, "log N", "log(-log PU)")
        ax.legend(fontsize=7)
    return fig


def fig_loss_vs_pu(data: ReportData, tasks):
    """Fig. 6: per instance, the reference's test loss against PU (non-zero PU only)."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = data.results[(data.results["task"] == task) & (data.results["passes"] > 0)
                         & data.results["ref_tokens"].gt(0)]
        for model, gm in g.sort_values("n_params").groupby("model", sort=False):
            ax.plot(-gm["ref_logprob"] / gm["ref_tokens"], np.log(gm["pu"]), ".", label=model)
        _label(ax, task, "reference test loss", "log PU")
    axes[0].legend(fontsize=7)
    return fig


def fig_instances(data: ReportData, tasks):
    """Fig. 7: instance-level curves log(-log PU_i) against log N."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = data.results[data.results["task"] == task]
        for _, gi in g.sort_values("n_params").groupby("instance_id"):
            ok = (gi["passes"] > 0) & (gi["pu"] < 1)
            if ok.sum() >= 2:
                ax.plot(np.log(gi["n_params"][ok]), _f(gi["pu"][ok]), "-", lw=0.8, alpha=0.6)
        _label(ax, task, "log N", "log(-log PU_i)")
    return fig


def fig_emergence(data: ReportData, tasks, classes):
    """Fig. 8: F(N) per task with the plain law and the two-circuit fit; the class in the title."""
    fig, axes = _grid(len(tasks))
    fns = _hypotheses()
    for ax, task in zip(axes, tasks):
        g = data.results[data.results["task"] == task]
        mean = g.groupby("n_params")["pu_unbiased"].mean()
        ok = (mean > 0) & (mean < 1)
        x, y = np.log(mean.index[ok]), _f(mean[ok])
        ax.plot(x, y, "o", color="k")
        res = classes.get(task)
        comps = ()
        if len(x) >= 3:  # the hypotheses refitted to the points drawn, equal weights
            xs = np.linspace(x.min(), x.max(), 50)
            comps = compare_hypotheses(np.asarray(x), np.asarray(y), np.full(len(x), 0.01))
        for comp in comps:
            fn, names = fns[comp.name]
            ax.plot(xs, fn(xs, np.array([comp.params[n] for n in names])), lw=1,
                    label=f"{comp.name} (BIC {comp.bic:.1f})")
        _label(ax, f"{task}: {res.category if res else '?'}", "log N", "log(-log PU)")
        if comps:
            ax.legend(fontsize=7)
    return fig


def metric_panel(data: ReportData) -> pd.DataFrame:
    if data.completions.empty:
        return pd.DataFrame()
    sizes = data.results.drop_duplicates("model").set_index("model")["n_params"].to_dict()
    comps = data.completions[data.completions["model"].isin(sizes)]
    return metric_table(comps, data.references, sizes)


def fig_metrics(table: pd.DataFrame, tasks):
    """The metric-choice panel: the same samples under each metric, rescaled to [0, 1]."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = table[table["task"] == task]
        for col in ("exact_match", "contains", "edit_similarity"):
            v = g[col].to_numpy()
            span = v.max() - v.min()
            ax.plot(g["n_params"], (v - v.min()) / span if span > 0 else v * 0,
                    "o-", label=f"{col} (sharpness {sharpness(v):.2f})")
        ax.set_xscale("log")
        _label(ax, task, "N", "rescaled metric")
        ax.legend(fontsize=7)
    return fig


def _embed(fig, name: str, out_dir: Path) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    fig.savefig(out_dir / f"{name}.svg")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}", border=0)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1300px;margin:auto;padding:1em}}
img{{max-width:100%}} table{{border-collapse:collapse;font-size:13px}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}} pre{{white-space:pre-wrap}}
</style></head><body>
<h1>{title}</h1>
{body}
<script>
window.addEventListener("load", function () {{
  var imgs = document.querySelectorAll("img");
  var ok = 0;
  imgs.forEach(function (i) {{ if (i.complete && i.naturalWidth > 0) ok += 1; }});
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def write_report(data: ReportData, out_dir: Path, *, title: str = "passuntil report") -> Path:
    """Write report.html and the figures as PNG and SVG into out_dir; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(data.results["task"]))
    classes = {}
    for t in tasks:
        counts = _counts(data.results[data.results["task"] == t], data.k_target)
        try:
            classes[t] = classify(counts)
        except Exception:  # noqa: BLE001 - too little signal to classify: drawn without a class
            classes[t] = None
    parts = []
    figures = [
        ("fig2_passed_vs_samples", "Passed instances against sample count (paper Fig. 2)",
         fig_passed_vs_samples(data, tasks)),
        ("fig3_loss", "Reference test loss against N with the loss law (Fig. 3)", fig_loss(data, tasks)),
        ("fig4_forecast", "log(-log PU) against log N, forecasts and outcomes (Fig. 4)",
         fig_forecast(data, tasks)),
        ("fig6_loss_vs_pu", "Test loss against PU, per instance (Fig. 6)", fig_loss_vs_pu(data, tasks)),
        ("fig7_instances", "Instance-level scaling curves (Fig. 7)", fig_instances(data, tasks)),
        ("fig8_emergence", "Emergence classes with the two-circuit and two-step fits (Fig. 8)",
         fig_emergence(data, tasks, classes)),
    ]
    metrics = metric_panel(data)
    if not metrics.empty:
        figures.append(("metric_choice", "Metric choice: the same samples under each metric",
                        fig_metrics(metrics, list(dict.fromkeys(metrics["task"])))))
    for name, caption, fig in figures:
        parts.append(f"<h2>{html.escape(caption)}</h2>"
                     f'<img alt="{name}" src="data:image/png;base64,{_embed(fig, name, out_dir)}">')
    rows = [{"task": r["task"], "target": r["target"]["model"], "method": r["method"],
             "forecast": r["forecast"]["point"], "low": r["forecast"]["low"],
             "high": r["forecast"]["high"], "observed": s["observed"] if s else np.nan,
             "inside": (s["inside_interval"] if s else "not yet evaluated"),
             "warnings": "; ".join(r.get("warnings", []))} for r, s in data.forecasts]
    if rows:
        parts.append("<h2>Forecasts against outcomes</h2>" + _table(pd.DataFrame(rows)))
    cls = [{"task": t, "class": c.category, "curvature": c.curvature, "z": c.z}
           for t, c in classes.items() if c is not None]
    if cls:
        parts.append("<h2>Emergence classes</h2>" + _table(pd.DataFrame(cls)))
    if not metrics.empty:
        parts.append("<h2>Metric table</h2>" + _table(metrics))
    if not data.completions.empty:
        top = (data.completions.sort_values("count", ascending=False)
               .groupby(["model", "task"]).head(2)[["model", "task", "instance_id", "text", "count",
                                                    "passed"]])
        parts.append("<h2>Most frequent completions</h2>" + _table(top.head(60)))
    page = out_dir / "report.html"
    page.write_text(PAGE.format(title=html.escape(title), body="\n".join(parts)), encoding="utf-8")
    return page
