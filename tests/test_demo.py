import json

from passuntil.demo import run_demo


def test_quick_demo_pre_registers_then_scores(tmp_path):
    csv = run_demo(tmp_path, quick=True)
    forecasts = sorted(tmp_path.glob("quick-forecast-*.json"))
    assert len(forecasts) == 2 and csv.exists()
    before = [f.read_text() for f in forecasts]
    record = json.loads(before[0])
    assert record["target"]["model"] == "2.4B" and "2.4B" not in record["data"]["models"]
    run_demo(tmp_path, quick=True)  # resumable and idempotent: forecasts are never rewritten
    assert [f.read_text() for f in forecasts] == before
