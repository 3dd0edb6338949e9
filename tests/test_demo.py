import json

from passuntil.demo import run_demo
from passuntil.jsonio import loads
from passuntil.store import Store
from passuntil.tasks.base import Task
from tests.conftest import run_cli


def test_quick_demo_pre_registers_then_scores(tmp_path, monkeypatch, capsys):
    page = run_demo(tmp_path, quick=True, series="sim")
    forecasts = sorted(tmp_path.glob("sim-quick-*-forecast-*.json"))
    assert len(forecasts) == 2 and page.exists()
    before = [f.read_text() for f in forecasts]
    record = json.loads(before[0])
    assert record["target"]["model"] == "2.4B" and "2.4B" not in record["data"]["models"]
    summary = json.loads((tmp_path / "sim-quick-summary.json").read_text())
    assert summary["sim-scaling"]["class"] == "linear"
    assert summary["sim-accelerated"]["class"] in ("concave", "mixed")
    assert summary["sim-scaling"]["true_class"] == "linear"
    assert summary["sim-accelerated"]["true_class"] in ("concave", "mixed")
    # one scoring for all: score-forecast on the demo's own file and store says what the demo and
    # its report say, with "observed" meaning the same thing
    printed = capsys.readouterr().out  # the demo's own printout
    # before the target is evaluated: the warnings (or that none fired) and the pass@k profile
    assert printed.index("before 2.4B is evaluated") < printed.index("Forecasts for 2.4B")
    assert "Predicted mean pass@k of 2.4B" in printed and "k=1e6" in printed
    for task in ("sim-scaling", "sim-accelerated"):
        assert [q["k"] for q in summary[task]["pass_at_k"]][::2] == [1, 10, 100, 1000, 10**4, 10**5, 10**6]
        assert summary[task]["forecast"]["interval"] == "these instances"
        assert summary[task]["scored_against"] in ("exact", "likelihood")
    # beside PassUntil, the exact mode on every size: the warning before the target, both ways
    warned = {r["task"]: r for r in summary["warning_before_target"]}
    assert set(warned) == {"sim-scaling", "sim-accelerated"}
    assert warned["sim-accelerated"]["exact warned"] and not warned["sim-scaling"]["exact warned"]
    assert warned["sim-accelerated"]["budget"] == 3000 and warned["sim-accelerated"]["target"] == "2.4B"
    assert "Warning of accelerated emergence before 2.4B is seen" in printed
    section = page.read_text().split('id="warning-before-target"')[1].split("</section>")[0]
    assert "PassUntil (budget 3,000) vs exact" in section and ">sim-accelerated<" in section
    assert any(r.startswith("exact-") for r in Store(tmp_path / "demo.sqlite").runs())
    target = next(r for r in Store(tmp_path / "demo.sqlite").runs() if r.endswith("-target"))
    for path in forecasts:
        task = path.name.split("-forecast-")[1].removesuffix(".v3.json")
        code, out, err = run_cli(capsys, "score-forecast", str(path), str(tmp_path / "demo.sqlite"), "--run", target)
        assert code == 0, err
        score = loads(out)
        assert score["observed"] == summary[task]["observed"] and score["observed_is"] == summary[task]["observed_is"]
        assert score["inside_interval"] == summary[task]["inside"] and score["against"] == summary[task]["scored_against"]
        assert f"{score['observed']:.4g}" in page.read_text()
    run_demo(tmp_path, quick=True, series="sim")  # resumable; forecasts are never rewritten
    assert [f.read_text() for f in forecasts] == before
    # a task that changes (an upgrade) gets fresh runs and forecasts; the old ones stay as they were
    monkeypatch.setattr(Task, "digest", lambda self: "changed")
    run_demo(tmp_path, quick=True, series="sim")
    assert len(list(tmp_path.glob("sim-quick-*-forecast-*.json"))) == 4
    assert [f.read_text() for f in forecasts] == before
