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
# run only when named (`passuntil fit --method bayes`; a design run's width stop and forecasts use
# it by default): about 8x slower than the likelihood fit (docs/statistics.md, "Full-Bayes fit")
OPT_IN_FITTERS = frozenset({"bayes"})


def fit_task_law(counts: SeriesCounts, method: str):
    """FITTERS[method](counts), with data the method cannot use turned into one UserError line."""
    try:
        return FITTERS[method](counts)
    except (ValueError, np.linalg.LinAlgError) as err:  # e.g. no test losses, too few passes
        raise UserError(f"the {method} fit cannot run on this data: {err}") from None
