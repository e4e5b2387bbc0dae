"""The equal-time map's smoke run: `python -m benchmarks.time_map --quick` (every method on a
tiny corpus, about 30-50 s on 2 shared cores, marked `slow`) and its report."""

import json

import pytest

from benchmarks import time_map


def test_removed_misses():
    assert time_map.removed(0.9, 0.8) == pytest.approx(0.5)
    assert time_map.removed(0.8, 0.8) == pytest.approx(0.0)
    assert time_map.removed(0.7, 0.8) < 0


@pytest.mark.slow
def test_quick_time_map_runs_every_method_and_reports(tmp_path, run_benchmark):
    run_benchmark("time_map", "--quick", results=tmp_path)
    rows = {r["method"]: r for r in time_map.load(str(tmp_path))}
    assert set(rows) == set(time_map.METHODS)
    for method, row in rows.items():
        assert row["steps"] > 5, method
        assert row["train_seconds"] >= row["config"]["seconds"] or \
            row["steps"] >= row["config"]["max_steps"], method
        steps = [p["steps"] for p in row["curve"]]
        seconds = [p["seconds"] for p in row["curve"]]
        assert steps == sorted(steps) and seconds == sorted(seconds), method
        assert any("steps" in p["at"] and p["steps"] == 5 for p in row["curve"]), method
        for point in row["curve"]:
            assert 0.0 <= point["recall@10"] <= point["recall@100"] <= 1.0, method
        b = row["breakdown"]
        assert b["total_ms"] > 0 and b["step_ms"] > 0
        # The total is the step plus the amortised refresh and warm start.
        assert b["total_ms"] == pytest.approx(
            b["step_ms"] * (row["steps"] - 1) / row["steps"] + b["refresh_ms"] + b["setup_ms"],
            rel=0.05, abs=0.5)
        if method != "full":
            # The isolated parts explain the measured step to within a factor of 3 either way.
            parts = b["towers_ms"] + b["sampling_ms"] + b["cache_update_ms"]
            assert b["step_ms"] / 3 < parts < 3 * b["step_ms"], (method, b)
    for method in time_map.CACHES:
        b = rows[method]["breakdown"]
        assert b["sampling_ms"] > 0 and b["cache_update_ms"] > 0
        assert rows[method]["refreshes"] >= 1 and b["refresh_ms"] > 0
        assert rows[method]["cache_size"] == 256 and rows[method]["cache_fill"] == 1.0
    for method in time_map.BASELINES:
        assert rows[method]["breakdown"]["sampling_ms"] == 0.0
    # The cache's refresh and warm start count as training time.
    assert rows["cache"]["setup_seconds"] > 0

    run_benchmark("time_map", "--report", results=tmp_path, timeout=120)
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    compared = {c["method"]: c for c in summary["comparison"]}
    assert set(compared) == set(time_map.CACHES)
    for c in compared.values():
        assert c["best_baseline"] in time_map.BASELINES
        assert c["removed_equal_time"] == pytest.approx(
            time_map.removed(c["r@10"], c["best_r@10"]))
    assert (tmp_path / "seq-query.png").stat().st_size > 0
