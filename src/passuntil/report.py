"""`passuntil report`: one self-contained HTML page (figures embedded) plus PNG and SVG files.

The page opens with a run summary (models and N, tasks and their instance counts, K, budget,
seed, sampling settings, backends and sampler fingerprints, isolation, version) and the
definitions every number on it uses, then the paper's figures on the user's data, each with a
caption saying what is plotted and what was dropped or clipped (report_figures.py): passed
instances against sample count (Fig. 2), reference test loss against N (Fig. 3), the observed
mean PU with each pre-registered forecast, its own fit and its outcome (Fig. 4), test loss
against PU (Fig. 6), instance-level curves (Fig. 7), emergence classes (Fig. 8) and the
metric-choice panel; then formatted tables. Model text is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from passuntil import report_figures as figs
from passuntil.emergence import classify, classify_exact
from passuntil.errors import UserError
from passuntil.metrics import metric_table
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.forecast_record import EXACT, OBSERVED, ForecastRecord, ForecastScore
from passuntil.store import Store
from passuntil.tables import estimates_table


@dataclass
class ReportData:
    """What the report draws: the tidy results of the chosen runs, their completions, each run's
    recorded settings, and any forecasts with their scores (None: target not evaluated yet)."""

    results: pd.DataFrame
    completions: pd.DataFrame
    k_target: int
    forecasts: list[tuple[ForecastRecord, ForecastScore | None]] = field(default_factory=list)
    references: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)  # store.run_info of each run
    # per exact-match task: did a warning fire before the target, PassUntil vs exact probabilities
    # (`warning_table.warning_comparison`); empty: no such comparison was made
    warnings_before_target: list[dict] = field(default_factory=list)
    # every run's own rows (run_id, model, task, instance_id, done) before `results` keeps one row
    # per cell, so the run summary counts what each run holds (None: count `results`)
    run_rows: pd.DataFrame | None = None
    no_references: str | None = None  # why the tasks' references could not be read (no metric panel)


def _one_row_per_cell(results: pd.DataFrame, sampling: dict | None = None) -> pd.DataFrame:
    """One row per (model, task, instance): the last run's, except that a sampled row wins over an
    exact-mode row of the same cell (a demo store holds both; PassUntil's counts are what the
    figures draw), taking the exact p from it where its own run recorded none and, where
    `sampling` (run -> its sampling settings) is given, the exact run sampled as it did (an exact p
    at temperature 1 is not the pass probability of a run at 0.5)."""
    key = ["model", "task", "instance_id"]
    exact = results["stopped"] == "exact" if "stopped" in results else pd.Series(False, index=results.index)
    if "exact_p" in results and exact.any():
        setting = (results["run_id"].map(lambda r: repr(sampling.get(r))) if sampling and "run_id" in results
                   else pd.Series("", index=results.index))
        with_setting = results.assign(_setting=setting)
        match = [*key, "_setting"]
        known = with_setting[exact].drop_duplicates(match, keep="last").set_index(match)["exact_p"]
        filled = pd.Series(known.reindex(pd.MultiIndex.from_frame(with_setting[match])).to_numpy(),
                           index=results.index)
        results = results.assign(exact_p=results["exact_p"].fillna(filled))
    order = results.assign(_exact=exact).sort_values("_exact", ascending=False, kind="stable")
    return order.drop_duplicates(key, keep="last").drop(columns="_exact").sort_index()


def load_report_data(store: Store, run_ids: list[str], forecasts=(), warnings_before_target=()) -> ReportData:
    """Results, completions and settings of the runs; each forecast scored where its target
    model's results cover its instances (`ForecastRecord.score_results`)."""
    from passuntil.analysis import task_references

    frames = [f for f in (estimates_table(store, r) for r in run_ids) if not f.empty]
    if not frames:
        raise UserError(f"run(s) {', '.join(run_ids)} hold no results yet: nothing to report")
    every = pd.concat(frames, ignore_index=True)
    runs = [store.run_info(r) for r in run_ids]
    results = _one_row_per_cell(every, {r["run_id"]: _sampling(r["config"]) for r in runs})
    comps = pd.concat([store.completions(r) for r in run_ids], ignore_index=True)
    k_of = {r["run_id"]: r["config"]["engine"]["k_target"] for r in runs}
    scored = []
    for record in forecasts:
        rows = record.target_rows(results)
        scored.append((record, None if rows is None else
                       record.score_results(results, k_target=k_of[rows["run_id"].iloc[0]])))
    refs, missing = {}, None
    if not comps.empty:
        try:
            refs = task_references(store, run_ids)
        except UserError as err:  # a task file moved or edited since: the counts are still reported
            missing = str(err)
    return ReportData(results, comps, k_of[run_ids[0]], scored, refs, runs, list(warnings_before_target),
                      every[["run_id", "model", "task", "instance_id", "done"]], missing)


def _sampling(config: dict) -> tuple:
    """What decides a run's pass probabilities besides the model and instance: its sampling settings."""
    eng = config.get("engine", {})
    return tuple(eng.get(k) for k in ("temperature", "top_p", "top_k", "max_tokens"))


def _embed(fig, name: str, out_dir: Path) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    fig.savefig(out_dir / f"{name}.svg")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], caption: str = "") -> str:
    """A formatted HTML table: numbers to 4 significant digits, text escaped, empty cells as –."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f'<td class="{"t" if isinstance(r[c], str) else "n"}">'
                                    f"{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings(info: dict) -> dict:
    cfg, eng = info["config"], info["config"].get("engine", {})
    design = cfg.get("design")
    k_stop = eng.get("k_target") if not design else (  # a design run records K = the cap: no K-stop
        f"off (sequential design toward N = {design.get('target_n', float('nan')):.3g})")
    budget = eng.get("max_samples")
    if cfg.get("exact") == "on":  # nothing sampled: K and the budget were never used
        k_stop = budget = "none: exact pass probabilities, no samples"
    return {"K (passes to stop at)": k_stop, "budget (max samples per instance)": budget,
            "seed": eng.get("seed"), "temperature": eng.get("temperature"), "top-p": eng.get("top_p"),
            "top-k": eng.get("top_k") or "off", "max new tokens": eng.get("max_tokens") or "the task's",
            "distinct completions stored per instance": eng.get("completions_cap"), "series": cfg.get("series"),
            "instance limit": cfg.get("limit") or "none",
            "reference scores": "off" if cfg.get("reference_scores") is False else "on",
            "code-check isolation": cfg.get("isolation") or "not recorded (no code task, or an older run)",
            "passuntil version": f"{info['package_version']} ({(info.get('git_commit') or 'no commit')[:10]})",
            "created": info["created_at"]}


def run_summary(data: ReportData) -> str:
    """The runs' settings side by side, then every model and task with where it ran."""
    per_run = {info["run_id"]: _settings(info) for info in data.runs}
    settings = [{"setting": k, **{run: _fmt(v[k]) for run, v in per_run.items()}}
                for k in next(iter(per_run.values()))]
    models, tasks, notes = [], {}, []
    for info in data.runs:
        cfg, run = info["config"], info["run_id"]
        every = data.results if data.run_rows is None else data.run_rows
        res = every[every["run_id"] == run]
        samplers, names = cfg.get("samplers", {}), cfg.get("task_names", {})
        models += [{"model": m["name"], "N (non-embedding)": float(m["n_params"]), "backend": m.get("backend", ""),
                    "path or URL": str(m.get("path") or "–"), "run": run,
                    "sampler": ", ".join(f"{k}={v}" for k, v in sorted(samplers.get(m["name"], {}).items())) or "–",
                    "instances done": int(res.loc[res["model"] == m["name"], "done"].sum())}
                   for m in sorted(cfg.get("models", []), key=lambda m: m["n_params"])]
        for source in cfg.get("tasks", []):
            name = names.get(source) or source
            row = tasks.setdefault(name, {"task": name, "source": source, "instances": 0, "runs": ""})
            row["instances"] = max(row["instances"], int(res.loc[res["task"] == name, "instance_id"].nunique()))
            row["runs"] = ", ".join(filter(None, (row["runs"], run)))
        notes += [f"{run} {n.get('model', '')} {n.get('stage', '')}: {n.get('note', '')}" for n in cfg.get("notes", [])]
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return ('<section id="run-summary"><h2>Run summary</h2>' + _table(settings, "settings of each run")
            + _table(models, "models") + _table(list(tasks.values()), "tasks")
            + (f"<p>Notes recorded during the runs:</p><ul>{note_html}</ul>" if note_html else "") + "</section>")


DEFINITIONS = f"""<section id="definitions"><h2>Definitions used on this page</h2><ul>
<li><b>observed</b> (mean PU of a model on a task): the {OBSERVED}, where n is the samples drawn
until K passes or the budget (K/n itself, the MLE, overstates a small p about twice at K = 2).</li>
<li><b>exact p</b>: the {EXACT}, computed by the backend in one forward pass for exact-match checks
(shown under this name, never as "observed").</li>
<li><b>PU_i</b> (per-instance panels): passes / samples of one instance.</li>
<li><b>these instances</b> (a forecast's default interval, at its level): for the mean PU over the
forecast's own instances (the user's test set) at the target size; it is what scoring uses.
<b>population</b>: for the mean over the task's whole population of instances, of which the forecast's are a
sample (usually, not always, wider).</li>
<li><b>scored against</b>: "exact" (the mean exact p inside the "these instances" interval, where every
instance has one) or "likelihood" (the target's cells scored by their own likelihood under the forecast:
z = standardised excess of passes, inside when |z| is within the level's normal quantile; a cell with no pass
counts by its binomial probability, not as "outside").</li>
<li><b>warnings</b> of a forecast were recorded in its file when it was made, before the target was
evaluated (codes: docs/statistics.md).</li>
</ul></section>"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1300px;margin:auto;padding:1em}}
img{{max-width:100%}} table{{border-collapse:collapse;font-size:13px;margin:.5em 0 1em}}
caption{{text-align:left;font-weight:600}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}} td.t{{text-align:left;max-width:40em;
overflow-wrap:break-word}} figure{{margin:1em 0 2em}} figcaption{{font-size:14px;color:#333;max-width:60em}}
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


def _forecast_rows(data: ReportData) -> list[dict]:
    rows = []
    for r, s in data.forecasts:
        pop = r.pop_interval
        rows.append({"task": r.task, "target": r.target_model or "–", "N": r.target_n, "method": r.method,
                     "forecast": r.point,
                     "these instances": f"[{r.these_low:.4g}, {r.these_high:.4g}] ({r.level:.0%})",
                     "population": "–" if pop is None else f"[{pop[0]:.4g}, {pop[1]:.4g}]",
                     "observed": s.observed if s else "not evaluated yet", "exact p": s.exact if s else None,
                     "scored against": s.against if s else None,
                     "z": s.z if s else None,
                     "inside": s.inside_interval if s else None,
                     "inside (exact p)": s.exact_inside_interval if s else None,
                     "threshold sizes": "; ".join(f"PU {t.target:g} at N = {_fmt(t.n_params)} "
                                                  f"[{_fmt(t.low)}, {_fmt(t.high)}]" for t in r.thresholds) or "–",
                     "made": f"{r.created_at} by {r.package_version}",
                     "warnings (recorded before the target was evaluated)": "; ".join(r.warnings) or "none fired"})
    return rows


def _task_class(g: pd.DataFrame, k_target: int):
    """A task's emergence class: `classify_exact` where every row is an exact probability (an
    exact-mode run: no samples, so the sampled `classify` would see empty cells), else
    `classify` on the PassUntil counts; None where there is too little signal to classify."""
    try:
        if "stopped" in g and (g["stopped"] == "exact").all() and g["exact_p"].notna().all():
            table = g.pivot_table(index="instance_id", columns="n_params", values="exact_p")
            return classify_exact(table.columns.to_numpy(dtype=float), table.to_numpy(dtype=float))
        return classify(SeriesCounts.from_table(g, k_target=k_target))
    except Exception:  # noqa: BLE001 - too little signal to classify: drawn without a class
        return None


WARNING_CAPTION = (
    "warning before {target}: whether the accelerated-emergence warning fired from the sizes below {target} "
    "alone, before it was evaluated: from PassUntil's counts at the budget of {budget:,} samples per instance "
    "(the warnings of its forecast of {target} from those sizes: the pre-registered file's where there is one) "
    "and from the exact pass probabilities of the same sizes (infinite "
    "resolution: one forward pass per instance, no sampling noise; the curvature z is classify_exact's). "
    "Each side's other warning codes are listed beside it; 'exact forecast' is the exact-ls law's mean p at "
    "{target}, 'exact p at {target}' the truth it is scored against.")


def warning_rows(data: ReportData) -> tuple[list[dict], str]:
    """The "warning before the target: PassUntil (budget B) vs exact" table and its caption."""
    rows = data.warnings_before_target
    if not rows:
        return [], ""
    target, budget = rows[0]["target"], rows[0]["budget"]
    out = [{"task": r["task"], f"PassUntil (budget {budget:,}) warned": r["PassUntil warned"],
            "PassUntil class": r["PassUntil class"], "PassUntil warnings": r["PassUntil warnings"],
            "exact warned": r["exact warned"], "exact class": r["exact class"],
            "exact curvature z": r["exact curvature z"], "exact warnings": r["exact warnings"],
            "exact forecast": r["exact forecast"], f"exact p at {target}": r["exact p at target"]} for r in rows]
    return out, WARNING_CAPTION.format(target=target, budget=budget)


def write_report(data: ReportData, out_dir: Path, *, title: str = "passuntil report") -> Path:
    """Write report.html and the figures as PNG and SVG into out_dir; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res = data.results
    tasks = list(dict.fromkeys(res["task"]))
    classes = {t: _task_class(res[res["task"] == t], data.k_target) for t in tasks}
    figures = [("fig2_passed_vs_samples", "Passed instances against sample count (paper Fig. 2)",
                figs.fig_passed_vs_samples(res, tasks)),
               ("fig3_loss", "Reference test loss against N with the loss law (Fig. 3)", figs.fig_loss(res, tasks)),
               ("fig4_forecast", "Observed mean PU against N, forecasts and outcomes (Fig. 4)",
                figs.fig_forecast(res, tasks, data.forecasts)),
               ("fig6_loss_vs_pu", "Test loss against PU, per instance (Fig. 6)", figs.fig_loss_vs_pu(res, tasks)),
               ("fig7_instances", "Instance-level scaling curves (Fig. 7)", figs.fig_instances(res, tasks)),
               ("fig8_emergence", "Emergence classes with the two-circuit and two-step fits (Fig. 8)",
                figs.fig_emergence(res, tasks, classes))]
    if any(r.pass_at_k for r, _ in data.forecasts):
        figures.insert(3, ("fig_pass_at_k", "Predicted pass@k of each forecast's target model",
                           figs.fig_pass_at_k(data.forecasts)))
    metrics = pd.DataFrame()
    if not data.completions.empty and data.no_references is None:
        sizes = res.drop_duplicates("model").set_index("model")["n_params"].to_dict()
        metrics = metric_table(data.completions[data.completions["model"].isin(sizes)], data.references, sizes)
        coverage = 1 - res["overflow"].sum() / max(1, res["samples"].sum())
        figures.append(("metric_choice", "Metric choice: the same samples under each metric",
                        figs.fig_metrics(metrics, list(dict.fromkeys(metrics["task"])), coverage)))
    parts = [run_summary(data), DEFINITIONS]
    if data.no_references:
        parts.append(f"<p>No metric-choice panel or metric table: {html.escape(data.no_references)}.</p>")
    for name, heading, (fig, caption) in figures:
        parts.append(f'<figure id="{name}"><h2>{html.escape(heading)}</h2>'
                     f'<img alt="{name}" src="data:image/png;base64,{_embed(fig, name, out_dir)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if data.forecasts:
        parts.append("<h2>Forecasts against outcomes</h2>" + _table(
            _forecast_rows(data), "observed = mean unbiased PassUntil estimate of the target (reported beside "
                                  "the score); inside = the score's verdict: the exact p within the 'these instances' "
                                  "interval, or |z| of the cells' likelihood within the level's normal quantile"))
    warn, caption = warning_rows(data)
    if warn:
        parts.append(f'<section id="warning-before-target"><h2>Warning before {html.escape(data.warnings_before_target[0]["target"])}: '
                     f'PassUntil (budget {data.warnings_before_target[0]["budget"]:,}) vs exact</h2>'
                     + _table(warn, caption) + "</section>")
    cls = [{"task": t, "class": c.category, "curvature": c.curvature, "SE": c.curvature_se, "z": c.z,
            "sizes used": c.models_used, "note": c.note or "–"} for t, c in classes.items() if c is not None]
    parts.append("<h2>Emergence classes</h2>" + _table(cls, "instance-level curvature test (|z| > 2.5: not linear)"))
    if not metrics.empty:
        share = (1 - res.groupby(["task", "model"])["overflow"].sum()
                 / res.groupby(["task", "model"])["samples"].sum().clip(lower=1))
        rows = [{"task": r.task, "model": r.model, "N": float(r.n_params),
                 "exact match (stored samples)": float(r.exact_match), "contains": float(r.contains),
                 "char edit distance": float(r.edit_distance), "token edit distance": float(r.token_edit_distance),
                 "edit similarity": float(r.edit_similarity),
                 "share of samples stored": float(share.get((r.task, r.model), float("nan")))}
                for r in metrics.itertuples()]
        parts.append("<h2>Metric table</h2>" + _table(
            rows, "per model x task, averaged over instances, from the stored distinct completions weighted by "
                  "their counts; exact match here is the pass rate of the stored samples (not the observed PU)"))
    if not data.completions.empty:
        top = (data.completions.sort_values("count", ascending=False).groupby(["model", "task"]).head(2).head(60))
        parts.append("<h2>Most frequent completions</h2>" + _table(
            [{"model": r.model, "task": r.task, "instance": str(r.instance_id), "text": str(r.text)[:300],
              "count": int(r.count), "passed": bool(r.passed)} for r in top.itertuples()],
            "the two most frequent stored texts per model x task (texts cut at 300 characters)"))
    page = out_dir / "report.html"
    page.write_text(PAGE.format(title=html.escape(title), body="\n".join(parts)), encoding="utf-8")
    return page
