"""Two constructions of the full-Bayes fit's "population" interval, compared on the same fits.

    .venv/bin/python benchmarks/population_constructions.py [--series 100] [--settings 4,2,5,6]
        [--design-series 60]

* model (what `BayesFit.forecast` reports): per MCMC draw, the mean PU over new instances drawn
  from that draw's fitted population N(mu, Sigma);
* bootstrap + expansion (what the likelihood fit reports): per draw, these instances' draws
  resampled, widened by Hesterberg's expansion (`TaskFit._expanded_means`).

Rows: `calibration.py`'s interval settings (same series and seeds), and the emergent regime's
sequential design run to a budget stop at 4e8 samples (the Bayes width stop's median spend;
series s from default_rng([0, s]) as in `calibration.design_coverage`). Prints, per row, the
coverage of the 90% "these instances" interval and of both population intervals, and the
median half-widths in log. docs/statistics.md, "The default fit", quotes one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from calibration import SETTINGS, TARGET, emergent_truth, law_series, population_mean, run_design

from passuntil.scaling.bayes import fit_bayes


def _row(label: str, fits_and_truths, pop: float) -> str:
    """One table row from (Bayes fit, true mean of these instances) pairs."""
    these = model = boot = 0
    widths = []
    for fit, truth in fits_and_truths:
        f = fit.forecast(TARGET)
        lo, hi = np.quantile(fit._expanded_means(fit.instance_draws(TARGET), 0.9, 0), [0.05, 0.95])
        these += f.these_low <= truth <= f.these_high
        model += f.population_low <= pop <= f.population_high
        boot += lo <= pop <= hi
        widths.append((np.log(f.these_high / f.these_low) / 2, np.log(f.population_high / f.population_low) / 2,
                       np.log(hi / lo) / 2))
    n = len(widths)
    w = np.median(widths, axis=0)
    return (f"| {label} | {n} | {these / n:.0%} | {model / n:.0%} | {boot / n:.0%} | "
            f"{w[0]:.2f} / {w[1]:.2f} / {w[2]:.2f} |")


def settings_fits(index: int, series: int):
    regime, k, budget = SETTINGS[index]
    rng = np.random.default_rng([0, k, budget, len(regime)])  # calibration.interval_coverage's seeds
    for _ in range(series):
        counts, p = law_series(regime, rng, k_target=k, budget=budget)
        yield fit_bayes(counts.select_models(np.arange(6))), p[:, -1].mean()


def design_fits(series: int, budget: int = 4 * 10**8):
    from passuntil.scaling.design import SequentialDesign

    for s in range(series):
        rng = np.random.default_rng([0, s])
        p = emergent_truth(rng)
        design = SequentialDesign(TARGET, total_budget=budget, first_round=100_000, level=0.9, halfwidth=None)
        yield fit_bayes(run_design(p, design, rng, seed=s).counts), p[:, -1].mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--settings", default="4,2,5,6", help="calibration.py's interval rows (numbered from 0)")
    ap.add_argument("--design-series", type=int, default=60, help="0: no design row")
    args = ap.parse_args()
    t0 = time.time()
    print("| data | series | 'these' covers | population: model | population: bootstrap + expansion "
          "| median half-width log (these / model / bootstrap) |")
    print("|---|---|---|---|---|---|")
    for i in (int(s) for s in args.settings.split(",") if s):
        regime, k, budget = SETTINGS[i]
        print(_row(f"{regime}, K = {k or 'fixed n'}, {budget:.0e}", list(settings_fits(i, args.series)),
                   population_mean(regime)), flush=True)
    if args.design_series:
        print(_row("design stop at 4e8", list(design_fits(args.design_series)), population_mean("emergent")),
              flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
