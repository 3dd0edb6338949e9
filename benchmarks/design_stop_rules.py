"""Width-stop rules of the sequential design, evaluated on recorded runs (emergent regime).

The design's allocation does not depend on how it stops, so one run per series to the budget,
recording at every round the forecast's 90% "these instances" interval and statistics of the
counts, gives the stopping point of any width-stop rule: the first round at which the
interval is at most +-halfwidth, the slopes are identified (as `target_interval` asks) and the
rule agrees; without one, the budget. Series s of seed d is `benchmarks/calibration.py --part
design`'s series (truth from default_rng([d, s]), first round 1e5, rounds growing by 50%), so
the rule "none" reproduces its width-stop rows.

    .venv/bin/python benchmarks/design_stop_rules.py --seed 0 --series 100 --out traj0.jsonl
    .venv/bin/python benchmarks/design_stop_rules.py --read traj0.jsonl   # the tables again
    .venv/bin/python benchmarks/design_stop_rules.py --seed 0 --series 100 --method bayes --out b0.jsonl

`--method bayes`: every identified round's interval is the full-Bayes fit's (`fit_bayes(counts,
seed=s)`: point, "these instances" and population intervals, with its split-R-hats, smallest
importance ESS and seconds), so the rules stop on it; the allocation (which does not depend on
the stop) is still the design's own, so the rounds and counts are the likelihood runs'. The
likelihood interval of the same round is kept beside it (lik_lo, lik_hi, lik_point). Rounds
whose slopes are not identified, where no rule may stop, keep the likelihood numbers.

Prints, per rule: coverage of the 90% interval at the stop (of the true mean of the series' 20
instances at 2.45B), of the population interval, share stopped by width, median samples, bias
and RMSE of log(point); then coverage and z (log error / (half-width / 1.645)) by samples spent,
over every identified round of every series.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from calibration import TARGET, emergent_truth, population_mean, run_design

from passuntil.scaling.bayes import fit_bayes
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.design import SequentialDesign, _identified
from passuntil.scaling.task_law import fit_likelihood


def trajectory(seed: int, s: int, budget: int, pop: float, method: str = "likelihood") -> dict:
    """One series run to `budget` with every round's interval and count statistics."""
    t0 = time.time()
    rng = np.random.default_rng([seed, s])
    p = emergent_truth(rng)
    truth = float(p[:, -1].mean())
    design = SequentialDesign(TARGET, total_budget=budget, first_round=100_000, level=0.9)
    rounds = []

    def on_round(c: SeriesCounts) -> None:
        spent = int(c.samples.sum())
        if int(c.passes.sum()) == 0:
            rounds.append({"spent": spent, "half": None})
            return
        f = fit_likelihood(c).forecast(TARGET, level=0.9, seed=s)  # = target_interval's numbers
        identified = bool(_identified(c, design.min_passes))
        more = {}
        if method == "bayes" and identified:
            t1 = time.time()
            fit = fit_bayes(c, seed=s)
            more = {"lik_lo": float(f.these_low), "lik_hi": float(f.these_high), "lik_point": float(f.point)}
            f = fit.forecast(TARGET, level=0.9, seed=s)
            more.update({"rhat": fit.rhat(TARGET), "rhat_max": fit.extra["rhat"],
                         "rhat_hyper": max(fit.extra["rhat_hyper"]), "ess": min(fit.extra["is_ess"]),
                         "prior_sd": fit.extra["prior_sd"], "bayes_secs": time.time() - t1})
        lo, hi = float(f.these_low), float(f.these_high)
        two = (c.passes > 0).sum(axis=1) >= 2  # instances with passes at two or more sizes
        ip = np.asarray(f.instance_point, dtype=float)
        rounds.append({**more, "spent": spent, "half": float((np.log(hi) - np.log(max(lo, 1e-300))) / 2),
                       "point": float(f.point), "lo": lo, "hi": hi, "covered": lo <= truth <= hi,
                       "pop_covered": float(f.population_low) <= pop <= float(f.population_high),
                       "identified": identified, "n_two": int(two.sum()),
                       "share_two": float(np.nansum(ip[two]) / np.nansum(ip)) if np.nansum(ip) > 0 else 0.0})

    run_design(p, design, rng, seed=s, on_round=on_round)
    return {"series": s, "seed": seed, "truth": truth, "rounds": rounds, "secs": time.time() - t0}


def _consecutive(k: int):
    return lambda rs, i, run: run >= k


# rule name -> guard(rounds, i, narrow rounds in a row): may the run stop by width at round i?
RULES = {
    "none (as built)": lambda rs, i, run: True,
    "2 narrow rounds in a row": _consecutive(2),
    "3 narrow rounds in a row": _consecutive(3),
    "point inside last round's interval": lambda rs, i, run: run >= 2 and rs[i - 1]["lo"] <= rs[i]["point"] <= rs[i - 1]["hi"],
    ">= 6 instances pass at 2+ sizes": lambda rs, i, run: rs[i]["n_two"] >= 6,
    ">= 8 instances pass at 2+ sizes": lambda rs, i, run: rs[i]["n_two"] >= 8,
    ">= 10 instances pass at 2+ sizes": lambda rs, i, run: rs[i]["n_two"] >= 10,
    "those carry >= 80% of the forecast": lambda rs, i, run: rs[i]["share_two"] >= 0.8,
    "those carry >= 90% of the forecast": lambda rs, i, run: rs[i]["share_two"] >= 0.9,
    ">= 1e8 samples (min_samples)": lambda rs, i, run: rs[i]["spent"] >= 1e8,
}


def stop_round(rounds: list[dict], guard, halfwidth: float) -> tuple[int, str]:
    run = 0
    for i, r in enumerate(rounds):
        narrow = r["half"] is not None and r["half"] <= halfwidth and r["identified"]
        run = run + 1 if narrow else 0
        if narrow and guard(rounds, i, run):
            return i, "width"
    return len(rounds) - 1, "budget"


def rules_table(series: list[dict], halfwidth: float) -> None:
    print(f"| width-stop rule (±{halfwidth:g}) | series | 90% 'these' covers | 'population' covers | stopped by width "
          "| median samples | bias log | RMSE log |\n|---|---|---|---|---|---|---|---|")
    for name, guard in RULES.items():
        rows = [(d, *stop_round(d["rounds"], guard, halfwidth)) for d in series]
        stops = [(d, d["rounds"][i], why) for d, i, why in rows]
        err = np.array([np.log(r["point"] / d["truth"]) for d, r, _ in stops])
        print(f"| {name} | {len(stops)} | {np.mean([r['covered'] for _, r, _ in stops]):.0%} "
              f"| {np.mean([r['pop_covered'] for _, r, _ in stops]):.0%} "
              f"| {np.mean([why == 'width' for *_, why in stops]):.0%} "
              f"| {np.median([r['spent'] for _, r, _ in stops]):.2g} | {err.mean():+.3f} | {np.sqrt(np.mean(err**2)):.3f} |")


def spend_table(series: list[dict]) -> None:
    """Coverage and z by samples spent; for `--method bayes` runs also the likelihood interval's
    coverage on the same rounds and the Bayes fits' largest split-R-hat (log mean at the target)."""
    cov, z, lik, rhat = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    for d in series:
        for r in d["rounds"]:
            if r["half"] is None or not r["identified"]:
                continue
            b = np.floor(np.log10(r["spent"]) * 2) / 2
            cov[b].append(r["covered"])
            z[b].append(np.log(r["point"] / d["truth"]) / (r["half"] / 1.645))
            if "lik_lo" in r:
                lik[b].append(r["lik_lo"] <= d["truth"] <= r["lik_hi"])
                rhat[b].append(r["rhat"])
    extra = " likelihood covers (same rounds) | max R-hat |" if lik else ""
    print(f"\n| samples spent | rounds | 90% 'these' covers | z mean | z SD |{extra}\n|---|---|---|---|---|"
          + ("---|---|" if lik else ""))
    for b in sorted(cov):
        more = f" {np.mean(lik[b]):.0%} | {max(rhat[b]):.3f} |" if lik.get(b) else ""
        print(f"| 10^{b:.1f}–10^{b + 0.5:.1f} | {len(cov[b])} | {np.mean(cov[b]):.0%} | {np.mean(z[b]):+.2f} "
              f"| {np.std(z[b], ddof=1):.2f} |{more}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--budget", type=float, default=1e9)
    ap.add_argument("--halfwidth", type=float, default=0.25)
    ap.add_argument("--method", choices=("likelihood", "bayes"), default="likelihood",
                    help="the fit whose interval each identified round records (the rules stop on it)")
    ap.add_argument("--first", type=int, default=0, help="the first series (to continue a run)")
    ap.add_argument("--out", default=None, help="append each series' trajectory here (JSON lines)")
    ap.add_argument("--read", nargs="*", default=None, help="recorded trajectories: only print the tables")
    args = ap.parse_args()
    if args.read:
        series = [json.loads(line) for path in args.read for line in Path(path).read_text().splitlines()]
    else:
        pop, series, t0 = population_mean("emergent"), [], time.time()
        for s in range(args.first, args.first + args.series):
            series.append(trajectory(args.seed, s, int(args.budget), pop, args.method))
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(series[-1]) + "\n")
            done = s + 1 - args.first
            eta = (time.time() - t0) / done * (args.series - done)
            print(f"series {done}/{args.series}, ETA {eta:.0f} s", flush=True)
    rules_table(series, args.halfwidth)
    spend_table(series)


if __name__ == "__main__":
    main()
