"""The task-law fit methods by name (`--method`): each refuses data it cannot fit.

Its own module so that a method built on `task_law` (the full-Bayes fit, `bayes.py`) can be
registered without `task_law` importing it back.
"""

from __future__ import annotations

import numpy as np

from passuntil.errors import UserError
from passuntil.scaling.bayes import fit_bayes
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import (
    TaskFit,
    fit_dataset,
    fit_instances_ls,
    fit_likelihood,
    fit_loss_assisted,
)


def _checked(fitter, method: str):
    """`fitter` refusing data it cannot fit (ValueError), instead of a forecast that is not one.

    A law is a line in log N: from one size its slope is not identified, yet the likelihood fit
    returned its prior (alpha 0, "forecast" = the observed PU at any N), instance-ls a "0 [0, 0]"
    with every instance unfitted, and the dataset fit NaN. The raw fitters stay permissive for
    callers that fit partial data on purpose (the sequential design)."""
    def fit(counts: SeriesCounts) -> TaskFit:
        sizes = np.unique(counts.n_params[counts.samples.sum(axis=0) > 0])
        if sizes.size < 2:
            raise ValueError(f"a task law is a line in log N: it needs results at 2 or more model "
                             f"sizes (this data has {sizes.size})")
        if int(counts.passes.sum()) == 0:
            raise ValueError("no instance passed at any size: the data bound PU from above but hold "
                             "no law to extrapolate")
        result = fitter(counts)
        if np.isnan(result.a).all():
            what = ("the mean PU lies strictly between 0 and 1 at fewer than 2 sizes" if method == "dataset"
                    else "no instance has 0 < PU < 1 at 2 or more sizes, so no instance line can be fitted")
            raise ValueError(what)
        return result
    fit.__doc__ = fitter.__doc__
    return fit


FITTERS = {name: _checked(f, name) for name, f in (
    ("likelihood", fit_likelihood), ("instance-ls", fit_instances_ls), ("dataset", fit_dataset),
    ("loss-assisted", fit_loss_assisted), ("bayes", fit_bayes))}
# not in `fit`'s list of every method (about 8x slower than the likelihood fit); run when named,
# by `auto` on zero-heavy data, and by a design run's width stop (docs/statistics.md, "Full-Bayes fit")
OPT_IN_FITTERS = frozenset({"bayes"})

AUTO = "auto"  # the default of forecast and backtest: see `auto_method`
METHODS = (AUTO, *FITTERS)  # what --method accepts
# zero-heavy data with more instances than this get the likelihood fit under `auto` (and a note):
# the full-Bayes fit costs ~0.1 s per instance (2.6 / 10.5 / 20 / 49 s at 20 / 100 / 200 / 400
# instances), and a backtest refits it once per held-out size; 200 keeps HumanEval's 164 in
AUTO_BAYES_MAX_INSTANCES = 200
# ... and with fewer instances than this, too: the hierarchical fit's population spread is then
# its prior's (2 instances passing at one size: [0.55, 0.95] for a true 0.39, where the
# likelihood fit says [0.02, 1.00]). Passes at one size only are no reason: in the emergent
# regime at 1e5 samples per cell (71% of those series) the Bayes fit is the far less biased one.
AUTO_BAYES_MIN_INSTANCES = 5


def auto_method(counts: SeriesCounts) -> tuple[str, str]:
    """(method, note) that `--method auto` runs on `counts`: "bayes" where over half the
    evaluated cells have no pass, else "likelihood"; zero-heavy data get the likelihood fit, and
    a note saying why, where the instances are too many (slow) or too few
    (AUTO_BAYES_MAX_INSTANCES, AUTO_BAYES_MIN_INSTANCES); else the note is "".

    Zero-heavy data are where the likelihood fit's plug-in prior is measured biased and its
    intervals off (docs/statistics.md, "The default fit": emergent regime at 10^5 samples per
    cell, log bias +0.68 against the Bayes fit's +0.10; hard regime, population interval 96%
    against 94%), while on ordinary data the two agree and the likelihood fit is ~8x faster. The
    benchmarks' ordinary series have at most 23% zero cells, their hard and emergent ones at
    least 78%."""
    share = counts.zero_share
    instances = counts.passes.shape[0]
    if share <= 0.5:
        return "likelihood", ""
    if instances > AUTO_BAYES_MAX_INSTANCES:
        why = f"{instances} instances (> {AUTO_BAYES_MAX_INSTANCES}) make it slow"
    elif instances < AUTO_BAYES_MIN_INSTANCES:
        why = f"{instances} instance(s) (< {AUTO_BAYES_MIN_INSTANCES}) say little of the population"
    else:
        return "bayes", ""
    return "likelihood", (f"method auto: {share:.0%} of the cells have no pass, where the full-Bayes fit is "
                          f"usually the better one, but {why}; the likelihood fit was used (--method bayes runs it)")


def fit_task_law(counts: SeriesCounts, method: str):
    """FITTERS[method](counts), with data the method cannot use turned into one UserError line.
    `method` "auto": `auto_method`'s choice; where that is the Bayes fit and it cannot run, the
    likelihood fit. Why auto fell back to the likelihood fit is in `fit.extra["method_note"]`."""
    if method == AUTO:
        method, note = auto_method(counts)
        if method == "bayes":
            try:
                return FITTERS[method](counts)
            except (ValueError, np.linalg.LinAlgError) as err:
                method, note = "likelihood", f"method auto: the full-Bayes fit cannot run on this data ({err})"
        fit = fit_task_law(counts, method)
        if note:
            fit.extra["method_note"] = note
        return fit
    try:
        return FITTERS[method](counts)
    except (ValueError, np.linalg.LinAlgError) as err:  # e.g. no test losses, too few passes
        raise UserError(f"the {method} fit cannot run on this data: {err}") from None
