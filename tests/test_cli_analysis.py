"""The analysis commands refuse every malformed option and every data a fit cannot use with one
line `error: ...` and exit 2, never a traceback or a silently ignored value; what they print as
JSON is strict."""

from __future__ import annotations

import pytest

from passuntil.cli import main
from passuntil.jsonio import loads
from tests.conftest import run_cli

SMALL = [a for m in ("0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B") for a in ("--model", m)]


def _cli(*args):
    try:
        main(list(args))
    except SystemExit as exc:
        assert exc.code == 0, args


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis")
    full, two = str(d / "full.sqlite"), str(d / "two.sqlite")
    _cli("eval", "--task", "sim-scaling", "--store", full, "--k", "2", "--max-samples", "300", *SMALL)
    # two sizes and a budget of 3: too little for most fits (they raised ValueError tracebacks)
    _cli("eval", "--task", "sim-scaling", "--store", two, "--k", "1", "--max-samples", "3",
         "--model", "0.03B", "--model", "0.1B")
    _cli("forecast", full, "--task", "sim-scaling", "--target-n", "2.45e9", "--out", str(d / "f.json"))
    (d / "not.json").write_text("{ this is not json")
    return {"FULL": full, "TWO": two, "FC": str(d / "f.json"), "NOTJSON": str(d / "not.json"),
            "OUT": str(d / "new.json"), "DIR": str(d / "report")}


T = ("--task", "sim-scaling")
BAD = [
    (("fit", "FULL", *T, "--target-n", "0"), "--target-n"),
    (("fit", "FULL", *T, "--target-n", "-5"), "--target-n"),
    (("fit", "FULL", *T, "--target-n", "inf"), "finite"),
    (("fit", "FULL", *T, "--target-n", "nan"), "finite"),
    (("fit", "FULL", *T, "--target-n", "lots"), "not a number"),
    (("fit", "FULL", *T, "--level", "1.5"), "--level"),
    (("fit", "FULL", *T, "--level", "0"), "--level"),
    (("fit", "FULL", *T, "--method", "bogus"), "unknown fit method"),
    (("fit", "TWO", *T, "--method", "dataset", "--target-n", "1e9"), "dataset fit cannot"),
    (("fit", "TWO", *T, "--method", "loss-assisted"), "loss-assisted fit cannot run"),
    (("fit", "FULL", "--task", "nope"), "no results for task"),
    (("fit", "FULL", *T, "--model", "9B"), "no finished results for model"),
    (("fit", "FULL", *T, "--run", "nope"), "no run 'nope'"),
    (("forecast", "FULL", *T, "--target-n", "2e9", "--level", "1", "--out", "OUT"), "--level"),
    (("forecast", "FULL", *T, "--target-n", "2e9", "--threshold", "0", "--out", "OUT"), "--threshold"),
    (("forecast", "FULL", *T, "--target-n", "2e9", "--threshold", "1.5", "--out", "OUT"), "--threshold"),
    (("forecast", "FULL", *T, "--out", "OUT"), "give either --target-model"),
    (("forecast", "FULL", *T, "--target-n", "2e9", "--target-model", "1.5B", "--out", "OUT"), "give either"),
    (("forecast", "FULL", *T, "--target-model", "9B", "--out", "OUT"), "no model '9B' in run 'main' (models: 0.03B"),
    (("forecast", "TWO", *T, "--target-n", "1e9", "--method", "dataset", "--out", "OUT"), "dataset fit cannot"),
    (("forecast", "FULL", *T, "--target-n", "2e9", "--out", "FC"), "never overwritten"),
    (("backtest", "FULL", *T, "--level", "2"), "--level"),
    (("backtest", "TWO", *T), "at least 4 finished sizes"),
    (("emergence", "FULL", "--task", "nope"), "no results for task"),
    (("plan", "--pu", "2"), "--pu"),
    (("plan", "--pu", "-0.1"), "--pu"),
    (("plan", "--pu", "nan"), "--pu"),
    (("plan", "--pu", "0.1", "--k", "0"), "--k"),
    (("plan", "--pu", "0.1", "--max-samples", "0"), "--max-samples"),
    (("plan", "--pu", "0.1", "--k", "5", "--max-samples", "3"), "at least --k"),
    (("plan", "--pu", "0.1", "--samples-per-s", "0"), "--samples-per-s"),
    (("plan", "--pu", "0.1", "--store", "FULL", *T, "--model", "1.5B"), "not both"),
    (("plan", "--store", "FULL", *T), "give --task and --model"),
    (("plan",), "give --pu"),
    (("score-forecast", "missing.json", "FULL"), "no forecast file"),
    (("score-forecast", "NOTJSON", "FULL"), "not a forecast file"),
    (("score-forecast", "FC", "FULL"), "names no target model"),
    (("score-forecast", "FC", "FULL", "--model", "9B"), "no finished result"),
    (("score-forecast", "FC", "FULL", "--model", "1.5B", "--run", "nope"), "no run 'nope'"),
    (("report", "FULL", "--forecast", "missing.json", "--out", "DIR"), "no forecast file"),
    (("report", "FULL", "--run", "nope", "--out", "DIR"), "no run 'nope'"),
    (("metrics", "FULL", "--run", "nope"), "no run 'nope'"),
    (("show", "FULL", "--confidence", "1.5"), "confidence"),
    (("show", "FULL", "--confidence", "nan"), "confidence"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_malformed_option_or_unusable_data_is_one_line_and_exit_2(files, capsys, args, expected):
    code, out, err = run_cli(capsys, *(files.get(a, a) for a in args))
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


def test_weak_data_without_named_methods_lists_them_as_skipped(files, capsys):
    code, out, err = run_cli(capsys, "fit", files["TWO"], *T, "--target-n", "1e9", "--json")
    assert code == 0, err
    fits = loads(out)["fits"]  # strict JSON: NaN would be refused here
    assert "cannot" in fits["dataset"]["skipped"] and "cannot" in fits["loss-assisted"]["skipped"]
    code, out, err = run_cli(capsys, "emergence", files["TWO"], *T)
    assert code == 0 and loads(out)["category"] == "undetermined" and loads(out)["z"] is None


def test_valid_edges_are_accepted(files, capsys):
    code, out, _ = run_cli(capsys, "plan", "--pu", "1", "--pu", "1e-4", "--k", "1", "--max-samples", "1")
    assert code == 0 and "2 instances, K=1, budget 1" in out
    code, out, _ = run_cli(capsys, "plan", "--pu", "0", "--pu", "0.5", "--k", "2", "--max-samples", "5000")
    assert code == 0 and "1 instance(s) will probably end at the budget" in out  # a guess of 0 never passes
    code, out, err = run_cli(capsys, "fit", files["FULL"], *T, "--target-n", "2.45e9", "--level", "0.5",
                             "--method", "likelihood")
    assert code == 0 and "50% interval" in out, err


def test_backtest_scores_against_the_stored_exact_probability(files, capsys):
    """The simulated backend stores each instance's exact p beside its samples: the backtest
    scores each held-out size against their mean (not the noisy observed PU) and says so."""
    from passuntil import analysis
    from passuntil.store import Store
    from passuntil.tables import estimates_table

    rows = analysis.backtest(files["FULL"], task="sim-scaling", run_id=None, method="likelihood")
    store = Store(files["FULL"], create=False)
    df = estimates_table(store, store.runs()[-1])
    for r in rows:
        truth = df.loc[df["model"] == r["held_out"], "exact_p"].mean()
        assert r["against"] == "exact" and r["exact"] == pytest.approx(truth) and r["z"] is None
        assert r["covered"] == (r["low"] <= truth <= r["high"])
    code, out, err = run_cli(capsys, "backtest", files["FULL"], *T)
    assert code == 0 and "'these instances' intervals" in out and "exact p" in out, err
