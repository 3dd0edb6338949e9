import json

from passuntil.demo import run_demo
from passuntil.tasks.base import Task


def test_quick_demo_pre_registers_then_scores(tmp_path, monkeypatch):
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
    run_demo(tmp_path, quick=True, series="sim")  # resumable; forecasts are never rewritten
    assert [f.read_text() for f in forecasts] == before
    # a task that changes (an upgrade) gets fresh runs and forecasts; the old ones stay as they were
    monkeypatch.setattr(Task, "digest", lambda self: "changed")
    run_demo(tmp_path, quick=True, series="sim")
    assert len(list(tmp_path.glob("sim-quick-*-forecast-*.json"))) == 4
    assert [f.read_text() for f in forecasts] == before
