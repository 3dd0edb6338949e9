"""The report's figures, each returned with the caption a reader needs without the code.

Every function takes the report's tidy results (one row per model x task x instance with
n_params, passes, samples, pu, pu_unbiased[, ref_logprob, ref_tokens, exact_p]) and returns
`(figure, caption)`; the caption says what is plotted and what was dropped or clipped (how many
zero-pass points, and how they are drawn). One meaning of "observed" throughout: the mean over
instances of the unbiased PassUntil estimate (`forecast_record.OBSERVED`); per-instance panels
show PU_i = passes / samples, and exact probabilities are labelled "exact p".
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from passuntil.emergence import _hypotheses, compare_hypotheses  # noqa: E402
from passuntil.errors import UserError  # noqa: E402
from passuntil.metrics import sharpness  # noqa: E402
from passuntil.scaling.forecast import forecast_at  # noqa: E402
from passuntil.scaling.loss import fit_loss_law  # noqa: E402

F_HELP = "F = log(-log PU) (up = harder; PU 0.5, 0.1, 1e-3, 1e-6 are F = -0.37, 0.83, 1.93, 2.63)"
ZERO = ("model x task cell(s) where no instance passed (observed mean 0, F infinite) are drawn as open "
        "triangles on the top edge")


def F(pu):
    pu = np.clip(np.asarray(pu, dtype=float), 1e-300, 1 - 1e-12)
    return np.log(-np.log(pu))


def _grid(n: int):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _logx(ax) -> None:
    """A log x axis labelled at 1, 2 and 5 per decade (readable over less than one decade too)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+0", "e").replace("e+", "e")))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def observed_means(g: pd.DataFrame) -> pd.Series:
    """The observed mean PU per size (index n_params): mean of the unbiased estimate over instances."""
    return g.groupby("n_params")["pu_unbiased"].mean().sort_index()


def _draw_means(ax, mean: pd.Series, **kw) -> int:
    """Observed means on the F scale; zero means as open triangles on the top edge. Returns how
    many were zero."""
    ok = (mean > 0) & (mean < 1)
    if ok.any():
        ax.plot(mean.index[ok], F(mean[ok]), "o", color="k", label="observed mean PU", **kw)
    elif not ax.lines:  # nothing else on the F scale: an empty panel saying so
        ax.set_ylim(0, 3)
        ax.text(0.5, 0.4, "no pass at any size", transform=ax.transAxes, ha="center", va="center", color="0.4")
    zero = mean.index[mean <= 0]
    if len(zero):
        top = ax.get_ylim()[1]
        ax.plot(zero, [top] * len(zero), "^", mfc="none", color="k", clip_on=False, label="observed 0 (top edge)")
    return int(len(zero))


def fig_passed_vs_samples(res: pd.DataFrame, tasks):
    """Paper Fig. 2: instances with at least one pass within the first n samples."""
    fig, axes = _grid(len(tasks))
    never = cells = 0
    for ax, task in zip(axes, tasks):
        g = res[res["task"] == task]
        grid = np.unique(np.geomspace(1, max(2, int(g["samples"].max())), 30).astype(int))
        for model, gm in g.sort_values("n_params").groupby("model", sort=False):
            idxs = [json.loads(i) if isinstance(i, str) else list(i) for i in gm["pass_indices"]]
            first = np.array([min(i) + 1 if i else np.inf for i in idxs])
            never, cells = never + int(np.isinf(first).sum()), cells + len(first)
            ax.plot(grid, [(first <= n).sum() for n in grid], label=f"{model} (N={gm['n_params'].iloc[0]:.3g})")
        ax.set_xscale("log")
        _label(ax, f"{task} ({g['instance_id'].nunique()} instances)", "samples drawn per instance",
               "instances passed at least once")
        ax.legend(fontsize=7)
    return fig, (f"For each model, the number of instances with at least one pass within the first n samples "
                 f"(n on a log axis, up to the largest number drawn). Nothing is dropped: the {never} of {cells} "
                 "model x instance cells that never passed within their budget stay uncounted at every n.")


def fig_loss(res: pd.DataFrame, tasks):
    """Paper Fig. 3: the reference answers' mean test loss against N, with L(N) = (c/N)^a + L0."""
    fig, axes = _grid(len(tasks))
    missing = []
    for ax, task in zip(axes, tasks):
        g = res[(res["task"] == task) & res["ref_tokens"].fillna(0).gt(0)]
        if g.empty:
            missing.append(task)
            ax.set_title(f"{task}: no reference scores", fontsize=10)
            continue
        per = g.assign(loss=-g["ref_logprob"] / g["ref_tokens"]).groupby("n_params")["loss"].mean()
        ax.plot(per.index, per.values, "o", color="k", label="mean reference loss")
        if len(per) >= 3:
            try:
                fit = fit_loss_law(per.index.to_numpy(), per.to_numpy())
                n = np.geomspace(per.index.min(), per.index.max() * 3, 50)
                ax.plot(n, fit.predict(n), "-", color="C0", label=f"L(N) fit, alpha = {fit.alpha:.2f}")
            except (ValueError, RuntimeError):
                pass
        _logx(ax)
        _label(ax, task, "N (non-embedding parameters)", "loss (nats per token)")
        ax.legend(fontsize=7)
    return fig, ("Per size, the mean over instances of the reference answer's teacher-forced loss per token "
                 "(the paper's test loss), with the loss law L(N) = (c/N)^alpha + L0 fitted where there are "
                 "3 or more sizes, drawn to 3x the largest N."
                 + (f" No reference scores were stored for: {', '.join(missing)}." if missing else ""))


def _forecast_curve(ax, record) -> str:
    """The forecast's own fit, refitted on the data the file holds (`ForecastRecord.refit`, the
    same refit scoring uses), from the smallest fitted N to the target: mean PU and its "these
    instances" interval at each N (the same function that made the point)."""
    ns = np.geomspace(min(record.data.n_params), record.target_n, 12)
    try:
        fit, method = record.refit()
        if fit is None:
            return f" The {record.method} fit is not redrawn (not a task-law fit of counts)."
        fcs = [forecast_at(fit, n, level=record.level) for n in ns]
    except UserError as err:
        return f" The {record.method} fit could not be redrawn ({err})."
    ax.plot(ns, F([f.point for f in fcs]), "-", color="C3", lw=1.2,
            label=f"forecast's {method} fit" + ("" if method == record.method else f" (for {record.method})"))
    ax.fill_between(ns, F([f.high for f in fcs]), F([f.low for f in fcs]), color="C3", alpha=0.12,
                    label=f"its {record.level:.0%} interval (these instances)")
    return ""


def fig_forecast(res: pd.DataFrame, tasks, forecasts):
    """Paper Fig. 4: F of the observed mean PU against N, each forecast's fit, interval and outcome."""
    fig, axes = _grid(len(tasks))
    zeros, notes = 0, ""
    for ax, task in zip(axes, tasks):
        for record, score in forecasts:
            if record.task != task:
                continue
            notes += _forecast_curve(ax, record)
            p = record.point
            ax.errorbar([record.target_n], [F(p)], yerr=[[F(p) - F(record.these_high)], [F(record.these_low) - F(p)]],
                        fmt="s", color="C3", capsize=4, label=f"forecast for {record.target_model or 'target'}")
            if score is not None:
                ax.plot([record.target_n], [F(score.observed)], "*", color="C2", ms=11, label="outcome (observed)")
                if score.exact is not None:
                    ax.plot([record.target_n], [F(score.exact)], "D", mfc="none", color="C1", label="outcome (exact p)")
        zeros += _draw_means(ax, observed_means(res[res["task"] == task]))
        _logx(ax)
        _label(ax, task, "N (non-embedding parameters)", "log(-log PU)")
        ax.legend(fontsize=7)
    return fig, ("Black dots: the observed mean PU per size (all runs shown), on the scale "
                 f"{F_HELP}. Red: each pre-registered forecast (square: its point, bar: its \"these instances\" interval, "
                 "the mean over the forecast's own instances, what scoring uses) and the "
                 "forecast's own fit redrawn from the data in its file (line: mean PU, band: \"these instances\" interval) from the "
                 "smallest fitted size to the target; green star: the target's observed mean PU; orange diamond: "
                 f"the target's mean exact pass probability where the backend computed it. {zeros} {ZERO}." + notes)


def fig_pass_at_k(forecasts):
    """The pass@k profile each forecast predicts for its target model: mean pass@k over the
    forecast's instances against k (log scale), with its "these instances" interval."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = [r for r, _ in forecasts if r.pass_at_k]
    for i, record in enumerate(drawn):
        ks = [q.k for q in record.pass_at_k]
        ax.plot(ks, [q.mean for q in record.pass_at_k], "-o", ms=3, color=f"C{i}",
                label=f"{record.task} at {record.target_model or f'N={record.target_n:.3g}'}")
        ax.fill_between(ks, [q.low for q in record.pass_at_k], [q.high for q in record.pass_at_k],
                        color=f"C{i}", alpha=0.15)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (samples per instance)")
    ax.set_ylabel("mean pass@k over the instances")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    level = f"{drawn[0].level:.0%} " if drawn else ""
    skipped = len(forecasts) - len(drawn)
    return fig, ("The pass@k curve each pre-registered forecast predicts for its target model, without sampling "
                 "it: per posterior draw of every instance's PU p_i at the target size, the mean over the "
                 "forecast's instances of 1 - (1 - p_i)^k, for k = 1 ... 10^6 (half-decades); line: the mean "
                 f"over draws, band: the {level}interval over draws (\"these instances\": the forecast's own test "
                 "set, parameter uncertainty only). An instance the law forecasts near 0 keeps pass@k near 0 even "
                 "at k = 10^6; the curve is an extrapolation of the task law and inherits its warnings."
                 + (f" {skipped} forecast file(s) of an older schema or method carry no profile and are not drawn."
                    if skipped else ""))


def fig_loss_vs_pu(res: pd.DataFrame, tasks):
    """Paper Fig. 6: per instance, the reference's test loss against PU."""
    fig, axes = _grid(len(tasks))
    scored = res[res["ref_tokens"].fillna(0).gt(0) & res["task"].isin(tasks)]
    for ax, task in zip(axes, tasks):
        g = scored[(scored["task"] == task) & (scored["passes"] > 0)]
        for model, gm in g.sort_values("n_params").groupby("model", sort=False):
            ax.plot(-gm["ref_logprob"] / gm["ref_tokens"], np.log10(gm["pu"]), ".", label=model)
        _label(ax, task, "reference loss (nats per token)", "log10 PU_i")
        if not g.empty:
            ax.legend(fontsize=7)
    zero = int((scored["passes"] == 0).sum())
    unscored = int(res["task"].isin(tasks).sum() - len(scored))
    return fig, ("One dot per model x instance: the reference answer's loss per token against log10 of "
                 "PU_i = passes / samples. Dropped: "
                 f"{zero} cells with no pass (log PU undefined) and {unscored} cells without a reference score.")


def fig_instances(res: pd.DataFrame, tasks):
    """Paper Fig. 7: instance-level curves F(PU_i) against N."""
    fig, axes = _grid(len(tasks))
    drawn = total = 0
    for ax, task in zip(axes, tasks):
        g, label = res[res["task"] == task], "one line per instance"
        for _, gi in g.sort_values("n_params").groupby("instance_id"):
            total += 1
            ok = (gi["passes"] > 0) & (gi["pu"] < 1)
            if ok.sum() >= 2:
                drawn += 1
                ax.plot(gi["n_params"][ok], F(gi["pu"][ok]), "-", lw=0.8, alpha=0.6, label=label)
                label = None
        _logx(ax)
        _label(ax, task, "N (non-embedding parameters)", "log(-log PU_i)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig, (f"One line per instance through its sizes with 0 < PU_i < 1 (PU_i = passes / samples), on the "
                 f"scale {F_HELP}. Sizes where the instance never passed are left out of its line; {total - drawn} "
                 f"of {total} instances have fewer than two such sizes and are not drawn.")


def fig_emergence(res: pd.DataFrame, tasks, classes):
    """Paper Fig. 8: F of the observed mean against N with the hypotheses refitted; class in the title."""
    fig, axes = _grid(len(tasks))
    fns, zeros = _hypotheses(), 0
    for ax, task in zip(axes, tasks):
        mean = observed_means(res[res["task"] == task])
        ok = (mean > 0) & (mean < 1)
        x, y = np.log(mean.index[ok].to_numpy()), F(mean[ok])
        comps = compare_hypotheses(x, y, np.full(len(x), 0.01)) if len(x) >= 3 else ()
        xs = np.linspace(x.min(), x.max(), 50) if len(x) else x
        for comp in comps:
            fn, names = fns[comp.name]
            ax.plot(np.exp(xs), fn(xs, np.array([comp.params[n] for n in names])), lw=1,
                    label=f"{comp.name} (BIC {comp.bic:.1f})")
        zeros += _draw_means(ax, mean)
        res_c = classes.get(task)
        _logx(ax)
        _label(ax, f"{task}: {res_c.category if res_c else 'not classified'}", "N (non-embedding parameters)",
               "log(-log PU)")
        ax.legend(fontsize=7)
    return fig, ("Black dots: the observed mean PU per size; lines: the plain task law, two circuits (concave, "
                 "accelerated emergence) and two steps (convex) fitted to the dots with equal weights, BIC in the "
                 "legend (lower is better). The class in each title comes from the instance-level curvature test "
                 f"(`passuntil emergence`). {zeros} {ZERO} and are not fitted.")


def fig_metrics(table: pd.DataFrame, tasks, coverage: float):
    """The metric-choice panel: the same samples under each metric, rescaled to [0, 1]."""
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        g = table[table["task"] == task]
        for col in ("exact_match", "contains", "edit_similarity"):
            v = g[col].to_numpy()
            span = v.max() - v.min()
            ax.plot(g["n_params"], (v - v.min()) / span if span > 0 else v * 0, "o-",
                    label=f"{col.replace('_', ' ')} (sharpness {sharpness(v):.2f})")
        _logx(ax)
        _label(ax, task, "N (non-embedding parameters)", "metric rescaled to [0, 1]")
        ax.legend(fontsize=7)
    return fig, ("The same stored samples scored three ways, each metric min-max rescaled per task across sizes "
                 "(sharpness = largest step between neighbouring sizes / total change: 1 is a jump). Computed from "
                 f"the stored distinct completions weighted by their counts, which hold {coverage:.1%} of the "
                 "counted samples (a run stores at most its cap of distinct texts per instance).")
